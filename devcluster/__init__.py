"""Development tooling, not part of the operator or the runtime: the local Kubernetes control plane
(`cluster`), the process node that runs pods as local processes (`node`), the demo pipeline
(`pipeline`, `demo`) and test factories (`factories`).

It lives in the source checkout only: the `lmforge` wheel (and so the operator image and
`pip install lmforge[operator]`) does not contain it. `make install` (an editable install of the
checkout) makes it importable as `lmforge.devcluster`, which is what `make demo`, `make test` and
`lmforge cluster|node` use.
"""
