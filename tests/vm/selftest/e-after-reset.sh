#!/bin/sh
# Never runs: the VM was reset by the watchdog of the test before.
exit 0
