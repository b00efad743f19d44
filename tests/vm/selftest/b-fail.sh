#!/bin/sh
# Fails with a non-zero status.
echo "failing on purpose"
exit 3
