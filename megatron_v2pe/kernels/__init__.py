"""GPU kernels (Triton). Import a kernel module only where Triton is importable and the tensors are on CUDA;
``megatron_v2pe.v2pe.fused`` chooses between a kernel and its PyTorch reference."""
