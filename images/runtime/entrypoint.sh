#!/bin/sh
# lmforge runtime image entrypoint (for `docker run`; pods get their command from the operator):
#   serve ...     -> lmforge serve ...                       (OpenAI-compatible server, :8000)
#   train ...     -> python -m lmforge.runtime.train ...     (one process; use torchrun for more)
#   quantize ...  -> python -m lmforge.runtime.quantize ...
#   anything else runs as given (torchrun, deepspeed, bash, ...); no argument: lmforge --help.
set -e
case "${1:-}" in
  serve) shift; exec lmforge serve "$@" ;;
  train) shift; exec python -m lmforge.runtime.train "$@" ;;
  quantize) shift; exec python -m lmforge.runtime.quantize "$@" ;;
  ""|-h|--help) exec lmforge --help ;;
  *) exec "$@" ;;
esac
