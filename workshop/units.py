"""Units: memory is shown in GiB (2**30 bytes), as ``torch.cuda`` figures are; nvidia-smi and the host
logger write MiB."""

GIB = 1024**3
MIB = 1024**2


def mib_to_gib(mib: float) -> float:
    return mib / 1024
