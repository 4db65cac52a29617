# Device deployment and profiling; included from the Makefile (`include devices/deploy.mk`).
#
#   make deploy      DEVICE=rpi5 RUN=runs/digits-mlp-rpi5   copy the run's bundle to the device
#   make profile     DEVICE=rpi5 RUN=runs/digits-mlp-rpi5   profile it there -> RUN/profile/rpi5.json
#   make profile-all RUN=runs/digits-mlp-rpi5               every inventory device, side by side
#   make devices-list / make devices-check DEVICE=rpi5
#
# DEVICE is a name from devices/inventory.yaml (INVENTORY=file for another one);
# PROFILE_ARGS passes timing flags, e.g. PROFILE_ARGS="--runs 200 --min-seconds 5".
# User values reach the shell only as quoted environment variables, never spliced into commands.

VENV         ?= .venv
EDGEOPT      ?= $(VENV)/bin/edgeopt
PROFILE_ARGS ?=

export DEVICE RUN
ifdef INVENTORY
export EDGEOPT_INVENTORY := $(INVENTORY)
endif

_need_device = @test -n "$$DEVICE" || { echo "missing DEVICE=<name from devices/inventory.yaml>" >&2; exit 2; }
_need_run    = @test -n "$$RUN" || { echo "missing RUN=runs/<recipe>-<profile>" >&2; exit 2; }

.PHONY: deploy profile profile-all devices-list devices-check

deploy:
	$(_need_device)
	$(_need_run)
	$(EDGEOPT) devices deploy "$$DEVICE" "$$RUN"

profile:
	$(_need_device)
	$(_need_run)
	$(EDGEOPT) devices profile "$$DEVICE" "$$RUN" $(PROFILE_ARGS)

profile-all:
	$(_need_run)
	$(EDGEOPT) devices profile-all "$$RUN" $(PROFILE_ARGS)

devices-list:
	$(EDGEOPT) devices list

devices-check:
	$(_need_device)
	$(EDGEOPT) devices check "$$DEVICE"
