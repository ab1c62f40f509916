"""`python -m services.cli`: how the demo and the tests start fedvec's own processes."""

from services.cli import main

main()
