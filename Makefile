# cxr-screen: every command a user runs. The Makefile only wires CLIs together; logic lives in
# `python -m <package>.<module>` modules, each with --help.

SHELL := /bin/bash
PYTHON_BOOTSTRAP ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= ../shared/data/cxr3
REPORTS ?= reports
export DATA_DIR

MODEL ?= cnn3
MLFLOW_PORT ?= 5000
MLFLOW_TRACKING_URI ?= http://127.0.0.1:$(MLFLOW_PORT)# loop-demo starts a private one unless you set this yourself
export MLFLOW_TRACKING_URI

SWEEP_BUDGET ?= small
export SWEEP_BUDGET
SWEEP_OBJECTIVE ?= ## validation (default) or worst_source (adds leave-one-source-out to every trial)
export SWEEP_OBJECTIVE

.PHONY: help install lock test demo audit bench-data mlflow stop train train-all sweep champion model-report promote rollback registry evaluate recalibrate drift drift-demo loop-demo rollout feedback review review-bench mar serve latency triage explain gate gate-report conformance package-model charts-validate cluster cluster-stop etcd chromium images loadtest loadtest-saturation bench loso loso-champion perturb shortcuts train-lungs lungs-check clean

help: ## list targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip==26.3"
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .

install: $(PY) etcd chromium ## create .venv with the locked dependencies and the project (editable); etcd for the cluster tests, Chromium for the review browser test

etcd: ## etcd from Debian (etcd-server) for the test control plane, when it is missing
	@command -v etcd >/dev/null || { [ "$$(id -u)" = 0 ] || { echo "etcd missing: run 'apt-get install -y etcd-server' as root" >&2; exit 1; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null; }

chromium: ## headless Chromium + chromedriver from Debian for the review app's browser test, when missing
	@{ command -v chromium >/dev/null && command -v chromedriver >/dev/null; } || { [ "$$(id -u)" = 0 ] || { echo "chromium missing: run 'apt-get install -y chromium chromium-driver' as root" >&2; exit 1; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

lock: ## re-resolve requirements.txt and rewrite constraints.txt
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip freeze --exclude-editable > constraints.txt

test: install ## run the test suite (real servers, real images, small subsets)
	$(PY) -m pytest

demo: install audit champion serve ## the main job: audit, MLflow, small sweep if no champion, MAR, local serving, real requests
	$(PY) -m serving.demo
	@echo "demo: audit report at $(REPORTS)/audit/summary.md; MLflow UI at $(MLFLOW_TRACKING_URI); stop everything with 'make stop'"

audit: install ## data audit: flags, duplicates, exclusions, figures -> reports/audit
	$(PY) -m training.audit --data-dir $(DATA_DIR) --out $(REPORTS)/audit

bench-data: install ## images/s of the data pipeline with and without the preprocessed cache
	$(PY) -m training.bench_data --data-dir $(DATA_DIR) --out $(REPORTS)/bench/data.json

mlflow: install ## start the local MLflow server (SQLite + local artifacts) on 127.0.0.1:$(MLFLOW_PORT)
	@if [ "$(MLFLOW_TRACKING_URI)" = "http://127.0.0.1:$(MLFLOW_PORT)" ]; then \
		$(PY) -m training.mlflow_server start --port $(MLFLOW_PORT); \
	else echo "mlflow: using MLFLOW_TRACKING_URI=$(MLFLOW_TRACKING_URI)"; fi

stop: ## stop the local services started by make (MLflow, serving)
	-$(PY) -m serving.stack stop
	-$(PY) -m training.mlflow_server stop

train: mlflow ## train one family: make train MODEL=cnn3 (configs/train/$(MODEL).yaml)
	$(PY) -m training.train --config configs/train/$(MODEL).yaml --data-dir $(DATA_DIR)

train-all: mlflow ## every family on the full data -> reports/train-all/summary.{json,md}
	$(PY) -m training.train_all --data-dir $(DATA_DIR) --out $(REPORTS)/train-all

sweep: mlflow ## Ray Tune sweep (SWEEP_BUDGET=small|full, SWEEP_OBJECTIVE=validation|worst_source) -> registered champion, reports/sweep/leaderboard.{json,md}
	$(PY) -m training.sweep --budget $(SWEEP_BUDGET) --data-dir $(DATA_DIR) --report-dir $(REPORTS)/sweep

champion: mlflow ## register the shipped champion (models/champion) if none is registered yet; else a small sweep when none ships
	@$(PY) -c "from training.registry import alias_version; import sys; sys.exit(0 if alias_version('champion') else 1)" \
		&& echo "champion: models:/cxr-screen@champion exists" \
		|| { if [ -f models/champion/bundle.json ]; then $(PY) -m training.registry register-shipped --bundle models/champion --report $(REPORTS)/model/champion.json; \
		     else $(PY) -m training.sweep --budget small --data-dir $(DATA_DIR) --report-dir runs/sweep-report; fi; }

CHAMPION_BUNDLE ?= models/champion
LOSO_REPORT ?= $(REPORTS)/robustness/loso-efficientnet_lite0-lungs.json
model-report: install ## the champion's report card (per source, population, NIH view; issue-13 targets) -> reports/model/champion.{json,md}
	$(PY) -m training.model_report --bundle $(CHAMPION_BUNDLE) --data-dir $(DATA_DIR) --out $(REPORTS)/model $(if $(LOSO_REPORT),--loso $(LOSO_REPORT))

promote: mlflow ## make promote VERSION=n: champion -> n, old champion -> previous
	$(PY) -m training.registry promote --version $(VERSION)

rollback: mlflow ## swap champion and previous
	$(PY) -m training.registry rollback

registry: mlflow ## show registered versions and aliases
	$(PY) -m training.registry show

BUNDLE ?=
DATA ?= $(DATA_DIR)
evaluate: install ## full evaluation of BUNDLE=dir (or the champion) on DATA=labelled folder -> reports/evaluate
	$(PY) -m training.evaluate_bundle $(if $(BUNDLE),--bundle $(BUNDLE),--model-uri models:/cxr-screen@champion) \
		--data-dir $(DATA) --out $(REPORTS)/evaluate/$(notdir $(abspath $(DATA)))

recalibrate: install ## refit temperature + thresholds of BUNDLE on SITE=labelled folder -> OUT=new bundle
	$(PY) -m training.recalibrate --bundle $(BUNDLE) --data-dir $(SITE) --out $(OUT)

AUDIT_LOG ?= logs
DRIFT_REFERENCE ?= models:/cxr-screen@champion
DRIFT_OUT ?= $(REPORTS)/drift/latest
drift: install ## audit log vs the champion's reference -> $(DRIFT_OUT) (exit 0 ok, 3 retrain)
	$(PY) -m monitoring.drift --current $(AUDIT_LOG) --reference $(DRIFT_REFERENCE) --out $(DRIFT_OUT) $(DRIFT_ARGS)

drift-demo: install ## drift scenarios on the default data with BUNDLE (default: the champion) -> reports/drift/summary.json
	$(if $(BUNDLE),,$(PY) -m training.registry fetch --uri models:/cxr-screen@champion --out runs/champion/bundle)
	$(PY) -m monitoring.drift_demo --bundle $(or $(BUNDLE),runs/champion/bundle) --data-dir $(DATA_DIR) --out $(REPORTS)/drift

loop-demo: install ## the MLOps loop on real servers (private MLflow, TorchServe, Ray, Evidently): serve -> drift -> retrain -> promote -> rollout -> rollback -> reports/loop/loop.json
	$(if $(filter file,$(origin MLFLOW_TRACKING_URI)),env -u MLFLOW_TRACKING_URI) $(PY) -m monitoring.loop_demo --data-dir $(DATA_DIR) --out $(REPORTS)/loop/loop.json

rollout: install ## swap models:/cxr-screen@champion into the running `make serve` TorchServe (management API, no restart)
	$(PY) -m serving.rollout --model-uri $(MODEL_URI)

feedback: install ## make feedback REQUEST_ID=... LABEL=tuberculosis [REVIEWER=...]
	$(PY) -m monitoring.feedback add --request-id "$(REQUEST_ID)" --label "$(LABEL)" --reviewer "$(REVIEWER)" --audit-log $(AUDIT_LOG)

REVIEW_PORT ?= 8090
FEEDBACK_DB ?= ## empty: $$CXR_FEEDBACK_DB, else configs/review.yaml's (the store `make drift` reads)
review: install ## the radiologists' worklist on 127.0.0.1:$(REVIEW_PORT) over $(AUDIT_LOG) (first start writes a key to .cache/review/reviewers.json)
	$(PY) -m review.app --audit-log $(AUDIT_LOG) $(if $(FEEDBACK_DB),--feedback-db $(FEEDBACK_DB)) --port $(REVIEW_PORT) $(REVIEW_ARGS)

review-bench: install ## the worklist's index and page-1 times on a 100,000-line audit log -> reports/review/bench.json
	$(PY) -m review.bench --out $(REPORTS)/review/bench.json

PACKAGE ?= model-package
MODEL_URI ?= models:/cxr-screen@champion
METHOD ?= gradcam

mar: mlflow ## model package (MAR + config.properties, KServe storage layout) from the champion, or BUNDLE=dir
	$(PY) -m serving.mar $(if $(BUNDLE),--bundle $(BUNDLE),--model-uri $(MODEL_URI)) --out $(PACKAGE)

serve: mar ## serve the champion: TorchServe + KServe front on 127.0.0.1 (make stop)
	$(PY) -m serving.stack start --package $(PACKAGE)

latency: install ## single-request p50/p95 per protocol against `make serve` -> reports/serving/latency.json
	$(PY) -m serving.latency --out $(REPORTS)/serving/latency.json

triage: install ## worklist CSV of a folder: make triage DIR=... [OFFLINE=1 BUNDLE=dir]
	$(PY) -m serving.triage $(DIR) $(if $(OFFLINE),--offline --bundle $(BUNDLE)) --out $(REPORTS)/serving/worklist.csv

gate: install ## fit the gradability gate into BUNDLE=dir (default: the champion, fetched to runs/champion/bundle)
	$(if $(BUNDLE),,$(PY) -m training.registry fetch --uri models:/cxr-screen@champion --out runs/champion/bundle)
	$(PY) -m cxr_core.gate fit --bundle $(or $(BUNDLE),runs/champion/bundle) --data-dir $(DATA_DIR)

gate-report: install ## the gate's refusals on the real test split and on every garbage kind -> reports/serving/gate.json
	$(PY) -m serving.gate_report --bundle $(or $(BUNDLE),$(CHAMPION_BUNDLE)) --data-dir $(DATA_DIR) --out $(REPORTS)/serving/gate.json

conformance: install ## tritonclient + kserve's REST client against a fresh stack serving BUNDLE (default: the shipped champion) -> reports/serving/conformance.json
	$(PY) -m serving.conformance --bundle $(or $(BUNDLE),$(CHAMPION_BUNDLE)) --data-dir $(DATA_DIR) --out $(REPORTS)/serving/conformance.json

explain: mlflow ## Grad-CAM overlay of one image: make explain IMAGE=... [BUNDLE=dir] [METHOD=gradcam++]
	$(PY) -m serving.explain $(IMAGE) $(if $(BUNDLE),--bundle $(BUNDLE),--model-uri $(MODEL_URI)) --method $(METHOD) --out $(REPORTS)/serving/overlay.png

package-model: mar ## the folder to copy to a PVC or bucket (KServe storageUri): config/ + model-store/

charts-validate: install ## render, lint (--strict) and validate the Helm chart with every charts/cxr-screen/ci values file
	$(PY) -m charts.validate

CLUSTER_DIR ?= .cache/cluster
cluster: install ## a local control plane (etcd, kube-apiserver, controller-manager, scheduler, a Ready node; no kubelet) -> prints KUBECONFIG
	$(PY) -m tests.cluster start --dir $(CLUSTER_DIR)

cluster-stop: ## stop `make cluster` and remove its state
	$(PY) -m tests.cluster stop --dir $(CLUSTER_DIR)

images: ## build the serving and jobs images (local dockerd + debootstrap Debian 12 base) and /ping the serving image
	bash docker/build_images.sh

USERS ?= 4
DURATION ?= 60
WEIGHTS ?=
loadtest: install ## Locust headless against `make serve`: make loadtest USERS=8 DURATION=60 [WEIGHTS=v2=3,explain=0] -> reports/loadtest
	$(PY) -m loadtest.run --users $(USERS) --duration $(DURATION) $(if $(WEIGHTS),--weights $(WEIGHTS)) --data-dir $(DATA_DIR) --out $(REPORTS)/loadtest

loadtest-saturation: install ## Locust at saturation for 10 minutes on a private stack serving the shipped champion -> reports/loadtest/saturation_*
	$(PY) -m loadtest.run --bundle $(or $(BUNDLE),$(CHAMPION_BUNDLE)) --users 8 --duration 600 --data-dir $(DATA_DIR) --out $(REPORTS)/loadtest --name saturation

bench: install ## the model alone every way vs TorchServe vs KServe front, then tuning [BUNDLE=dir] -> reports/bench/bench.{json,md} (~13 min)
	$(PY) -m loadtest.bench $(if $(BUNDLE),--bundle $(BUNDLE)) --data-dir $(DATA_DIR) --out $(REPORTS)/bench

FAMILY ?= hog_logreg
ROBUSTNESS ?= configs/robustness.yaml
LOSO_NAME ?= loso
MITIGATIONS ?=
FOLDS ?=
OVERRIDES ?=
loso: install ## leave-one-source-out of FAMILY x MITIGATIONS (default all) over FOLDS [OVERRIDES="epochs=8"] -> reports/robustness/$(LOSO_NAME).{json,md} (~12 min for hog_logreg)
	$(PY) -m training.robustness.loso --config configs/train/$(FAMILY).yaml --data-dir $(DATA_DIR) \
		--robustness $(ROBUSTNESS) --out $(REPORTS)/robustness --name $(LOSO_NAME) \
		$(if $(MITIGATIONS),--mitigations $(MITIGATIONS)) $(if $(FOLDS),--folds $(FOLDS)) $(OVERRIDES)

# the shipped champion's family: three TB folds, the product's own source first (37-47 min a fold on 2 cores)
loso-champion: install ## leave-one-source-out of the champion's recipe (8 of its 12 epochs) -> reports/robustness/loso-efficientnet_lite0-lungs.*
	$(MAKE) loso FAMILY=efficientnet_lite0_lungs_long LOSO_NAME=loso-efficientnet_lite0-lungs MITIGATIONS=baseline \
		FOLDS=kaggle-cxr,tbdb,tbx11k OVERRIDES=epochs=8

perturb: install ## perturbation suite on BUNDLE=dir(s), else unmitigated + default + best mitigation of make loso -> reports/robustness/perturb.*
	$(PY) -m training.robustness.perturb $(if $(BUNDLE),$(foreach b,$(BUNDLE),--bundle $(b)),--from-loso $(REPORTS)/robustness/$(LOSO_NAME).json) \
		--data-dir $(DATA_DIR) --robustness $(ROBUSTNESS) --out $(REPORTS)/robustness

shortcuts: install ## source/age probes, lung masking, evidence outside the chest -> reports/robustness/shortcuts.*
	$(PY) -m training.robustness.shortcuts $(if $(BUNDLE),$(foreach b,$(BUNDLE),--bundle $(b)),--from-loso $(REPORTS)/robustness/$(LOSO_NAME).json) \
		--data-dir $(DATA_DIR) --robustness $(ROBUSTNESS) --out $(REPORTS)/robustness

LUNG_MASKS ?= ../shared/data/lung-masks
train-lungs: install ## lung segmenter from LUNG_MASKS -> models/lungs/segmenter.{pt,json}, reports/lungs/segmenter.*, then lungs-check (~10 min)
	$(PY) -m training.train_lungs --data-dir $(LUNG_MASKS) --weights models/lungs/segmenter.pt --report-dir $(REPORTS)/lungs
	$(MAKE) lungs-check

lungs-check: install ## the segmenter on every cxr3 test image: failure rates per source x class + contact sheet -> reports/lungs/cxr3-check.*
	$(PY) -m training.lungs_check --data-dir $(DATA_DIR) --weights models/lungs/segmenter.pt --out $(REPORTS)/lungs

clean: ## remove caches and local runs (keeps .venv and committed reports)
	rm -rf .cache mlruns mlartifacts model-store runs
