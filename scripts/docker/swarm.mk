# Docker Swarm deployment targets (docs/deploy.md, "Docker Swarm"); included by scripts/docker/deploy.mk, whose
# PROFILE, WORKERS, JOB, DEPLOY_JOB_FILE, DEPLOY_SECRETS and DEPLOY_ADMIN they share.
#   make stack-up PROFILE=cellular WORKERS=4   swarm init if needed, build missing images, deploy, wait until healthy,
#                                              submit the default job (one task per worker), print the URLs
#   make stack-up PS_SHARDS=3                  three PS shards (paramserver + services paramserver-shard-1, -2)
#   make stack-status | stack-down
#   make test-swarm       the Swarm suites: single node, images to a second engine, a three-node swarm that
#                         loses a node (`make e2e` runs all but the three-node one)
#   make test-swarm-3node the three-node suite alone (CI runs it last, reported without gating)
#   make swarm-images NODES="ssh://root@10.0.0.2"   copy the images to other engines (no registry); NODES=--nodes: all
STACK      ?= dlt-swarm
STACK_URL  := http://127.0.0.1:$(or $(DLT_CONTROLLER_PORT),8000)

.PHONY: stack-up stack-down stack-status swarm-images test-swarm test-swarm-3node

stack-up: install
	@[ "$(PROFILE)" = none ] || test -f deploy/netem/$(PROFILE).yaml || { echo "no profile deploy/netem/$(PROFILE).yaml; have: $$(ls deploy/netem | sed 's/.yaml//' | tr '\n' ' ')"; exit 2; }
	@scripts/docker/build_images.sh --missing
	@DLT_STACK=$(STACK) PS_SHARDS=$(PS_SHARDS) scripts/docker/stack_up.sh "$(PROFILE)" "$(WORKERS)"
	@if [ "$(JOB)" != none ]; then \
	  echo "submitting $(DEPLOY_JOB_FILE)"; \
	  $(DEPLOY_ADMIN) $(BIN)/dist-llm-train submit-job --config "$(DEPLOY_JOB_FILE)" --workers $(WORKERS) --controller $(STACK_URL) --name default \
	    || exit 1; fi
	@echo "controller   $(STACK_URL)/status  (make stack-status)"
	@echo "prometheus   http://127.0.0.1:$(or $(DLT_PROMETHEUS_PORT),9090)"

stack-status: install
	@docker stack services $(STACK)
	@$(DEPLOY_ADMIN) $(BIN)/dist-llm-train status --controller $(STACK_URL)

stack-down:
	@DLT_STACK=$(STACK) scripts/docker/stack_down.sh

swarm-images:
	@scripts/docker/swarm_images.sh $(or $(NODES),--nodes)

test-swarm: install
	@scripts/docker/setup_engine.sh
	@scripts/docker/build_images.sh
	TESTCONTAINERS_RYUK_DISABLED=true DLT_E2E_MULTINODE=1 $(BIN)/python -m pytest -m e2e tests/e2e/test_swarm_files.py \
	  tests/e2e/test_swarm_images.py tests/e2e/test_swarm_stack.py tests/e2e/test_swarm_multinode.py -q

# The three-node suite alone. A skip is a failure here: the suite skips when this engine is already in a swarm.
test-swarm-3node: install
	@scripts/docker/setup_engine.sh
	@scripts/docker/build_images.sh --missing
	@log=$$(mktemp); TESTCONTAINERS_RYUK_DISABLED=true DLT_E2E_MULTINODE=1 $(BIN)/python -m pytest -m e2e \
	  tests/e2e/test_swarm_multinode.py -q -rsP >"$$log" 2>&1; status=$$?; cat "$$log"; \
	  if grep -q ' skipped' "$$log"; then echo "test-swarm-3node: a skipped test counts as a failure"; status=1; fi; \
	  rm -f "$$log"; exit $$status
