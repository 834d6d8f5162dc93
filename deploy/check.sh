#!/usr/bin/env bash
# Every check of deploy/ in one go (`make lint` and `make test` run the same pieces):
#   hadolint on the Dockerfile, kubernetes-validate on deploy/k8s, promtool on the rules and
#   their unit tests, then the pytest checks of compose, dashboard, rules, manifests and image.
# Needs the dev extra in .venv and Debian's prometheus package (promtool).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}

"$BIN/hadolint" Dockerfile
"$BIN/kubernetes-validate" --strict --kubernetes-version 1.30.0 --quiet \
    deploy/k8s/*.yaml deploy/k8s/monitoring/*.yaml
promtool check rules --lint=all --lint-fatal deploy/prometheus/rules.yml
promtool test rules deploy/prometheus/tests/*.yml
"$BIN/pytest" -q tests/deploy "$@"
