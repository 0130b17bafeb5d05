# The real-netem-kernel suite (scripts/netem_vm/README.md). Included by the top-level Makefile, which provides
# `install` and $(BIN). Boots Debian's stock kernel under qemu TCG and runs tests/netem_vm inside it.
#
#   make test-netem-vm                       setup (idempotent), the harness's own host-side tests (3 short
#                                            boots), then one VM boot running the guest suite
#   make test-netem-vm NETEM_VM_ARGS='-k good'   extra pytest arguments
#
# Exit status is the suite's; the target is skipped (exit 0, with the reason printed) only when setup.sh returns 3,
# i.e. when qemu / busybox / the kernel package cannot be installed on this machine.

NETEM_VM_DIR     := scripts/netem_vm
NETEM_VM_ARGS    ?=
NETEM_VM_RESULTS ?= .cache/netem_vm/last

.PHONY: test-netem-vm netem-vm-setup

netem-vm-setup:
	$(NETEM_VM_DIR)/setup.sh

test-netem-vm: install
	@rc=0; $(NETEM_VM_DIR)/setup.sh || rc=$$?; \
	if [ $$rc -eq 3 ]; then echo "test-netem-vm: SKIPPED: setup could not provide qemu/kernel (reason above)"; exit 0; fi; \
	if [ $$rc -ne 0 ]; then echo "test-netem-vm: setup failed ($$rc)"; exit $$rc; fi; \
	$(BIN)/python -m pytest tests/netem_vm/test_harness.py -m netem_vm -p no:cacheprovider -q && \
	NETEM_VM_COLLECT=$(NETEM_VM_RESULTS) $(NETEM_VM_DIR)/run_in_vm.sh $(NETEM_VM_DIR)/guest_suite.sh $(NETEM_VM_ARGS)
