"""The ops interface: every numeric step of the model goes through one of these objects.

`CpuOps` is the plain-PyTorch reference; `CudaOps` (forge.ops.cuda) overrides the hot ops with
NVRTC-compiled kernels; `NativeCpuOps` (forge.ops.cpu_native) overrides the per-layer float ops
with forge's C++ kernels for quantized CPU models. The model code is written once against this interface.
"""

from forge.ops.cpu import CpuOps


def get_ops(device: str, quantized: bool = False):
    """quantized: the model's matrices are quantized (the CPU fast path); its float ops may then
    run in forge's native kernels. A float model on the CPU keeps the exact reference ops."""
    if device.startswith("cuda"):
        from forge.ops.cuda import CudaOps

        return CudaOps()
    if quantized:
        from forge import native

        lib = native.library()
        if lib is not None:
            from forge.ops.cpu_native import NativeCpuOps

            return NativeCpuOps(lib)
    return CpuOps()


__all__ = ["CpuOps", "get_ops"]
