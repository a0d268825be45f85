"""kopf handlers, one module per custom resource kind. Importing this package registers them
(`lmforge.operator.main.register_handlers`)."""

from lmforge.operator.controllers import (
    inferenceservice,  # noqa: F401
    quantizejob,  # noqa: F401
    trainjob,  # noqa: F401
)
