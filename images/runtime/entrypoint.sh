#!/bin/sh
# lmforge runtime image entrypoint (for `docker run`; pods get their command from the operator):
#   serve ...     -> lmforge serve ...      (OpenAI-compatible server on :8000)
#   train ...     -> lmforge train ...      (one node; TrainJob pods run torchrun/deepspeed themselves)
#   quantize ...  -> lmforge quantize ...
#   anything else runs as given (torchrun, deepspeed, python, bash, ...); no argument: lmforge --help.
set -e
case "${1:-}" in
  serve|train|quantize) exec lmforge "$@" ;;
  ""|-h|--help) exec lmforge --help ;;
  *) exec "$@" ;;
esac
