"""lmforge: a Kubernetes-native operator and runtime for LLM training, quantization and serving.

The repository root is this package (see pyproject's package-dir): `operator/` imports as
`lmforge.operator`, `runtime/` as `lmforge.runtime`, `kernels/` as `lmforge.kernels`.
"""

__version__ = "0.1.0"

API_GROUP = "lmforge.dev"
API_VERSION = "v1alpha1"
