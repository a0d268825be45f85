"""Where models, datasets, checkpoints and outputs live, and how they move: URI parsing
(`uri`), the S3 backend (`s3`, boto3), the Hugging Face Hub (`lmforge.runtime.hub`), fetch and
upload (`transfer`), the per-node model cache (`cache`) and progress reporting (`progress`).
Shared by the trainer, the quantizer, the server, `lmforge fetch` and LoRA adapter loading."""
