# Docker Compose deployment targets; included by the main Makefile (which defines BIN and `install`).
#   make images                         build dlt-{controller,paramserver,worker,prometheus} (base + wheelhouse automatic)
#   make up PROFILE=cellular WORKERS=4  build what is missing, start, wait until healthy, submit the default job
#   make up JOB=none | JOB=path.yaml    skip the job / submit another job config
#   make up TLS=1                       mutual TLS on the PS's gRPC (deploy/docker-compose.tls.yml; certs made once)
#   make up PS_SHARDS=3                 three PS shards, each holding a slice of the parameters (not with TLS=1)
#   make status | logs | down | e2e
PROFILE ?= good
WORKERS ?= 3
JOB     ?= default
TLS     ?= 0
PS_SHARDS ?= 1
DEPLOY_COMPOSE  := docker compose -f deploy/docker-compose.yml
DEPLOY_JOB_FILE := $(if $(filter default,$(JOB)),deploy/jobs/default.yaml,$(JOB))
DEPLOY_URL      := http://127.0.0.1:$(or $(DLT_CONTROLLER_PORT),8000)
DEPLOY_ENV      := PROFILE=$(PROFILE) WORKERS=$(WORKERS)
DEPLOY_SECRETS  := deploy/.secrets
# The operator's credential for the CLI calls below (made by scripts/docker/secrets.sh on `make up`).
DEPLOY_ADMIN    = DLT_AUTH_TOKEN="$$(cat $(DEPLOY_SECRETS)/admin_token)"

.PHONY: engine images up down logs status e2e certs

engine:
	@scripts/docker/setup_engine.sh

images: install
	@scripts/docker/build_images.sh

up: install
	@[ "$(PROFILE)" = none ] || test -f deploy/netem/$(PROFILE).yaml || { echo "no profile deploy/netem/$(PROFILE).yaml; have: $$(ls deploy/netem | sed 's/.yaml//' | tr '\n' ' ')"; exit 2; }
	@scripts/docker/build_images.sh --missing
	@TLS=$(TLS) PS_SHARDS=$(PS_SHARDS) scripts/docker/compose_up.sh "$(PROFILE)" "$(WORKERS)"
	@if [ "$(JOB)" != none ]; then \
	  echo "submitting $(DEPLOY_JOB_FILE)"; \
	  $(DEPLOY_ADMIN) $(BIN)/dist-llm-train submit-job --config "$(DEPLOY_JOB_FILE)" --workers $(WORKERS) --controller $(DEPLOY_URL) --name default \
	    || exit 1; fi
	@echo "controller   $(DEPLOY_URL)/status  (make status)"
	@echo "prometheus   http://127.0.0.1:$(or $(DLT_PROMETHEUS_PORT),9090)"
	@if $(DEPLOY_COMPOSE) ps --services --status running | grep -qx grafana; then \
	  echo "grafana      http://127.0.0.1:$(or $(DLT_GRAFANA_PORT),3000)"; fi

down:
	@$(DEPLOY_COMPOSE) --profile grafana down --volumes --remove-orphans --timeout 20

logs:
	@$(DEPLOY_COMPOSE) logs --tail 200 --follow

status: install
	@$(DEPLOY_ADMIN) $(BIN)/dist-llm-train status --controller $(DEPLOY_URL)

# TLS for the PS's gRPC: a private CA, the PS's certificate and client certificates (docs/security.md).
certs: install
	@$(BIN)/dist-llm-train certs --out $(DEPLOY_SECRETS)/certs --host paramserver --host localhost \
	  --host 127.0.0.1 --client controller --client worker

e2e: install
	@scripts/docker/setup_engine.sh
	@scripts/docker/build_images.sh
	TESTCONTAINERS_RYUK_DISABLED=true $(BIN)/python -m pytest -m e2e tests/e2e -q
-include scripts/docker/swarm.mk
