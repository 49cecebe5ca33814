#!/usr/bin/env bash
# Install and start what the test suite needs (placeholder: filled in by the images/test-bed work).
set -euo pipefail
