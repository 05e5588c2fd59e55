"""The ops interface: every numeric step of the model goes through one of these objects.

`CpuOps` is the plain-PyTorch reference; `CudaOps` (forge.ops.cuda) overrides the hot ops with
NVRTC-compiled kernels. The model code is written once against this interface.
"""

from forge.ops.cpu import CpuOps


def get_ops(device: str):
    if device.startswith("cuda"):
        from forge.ops.cuda import CudaOps

        return CudaOps()
    return CpuOps()


__all__ = ["CpuOps", "get_ops"]
