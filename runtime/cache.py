import torch


class LatentCache:
    """MLA's compressed KV cache: per layer and token only RMSNorm(c_kv) and the rotated shared rope key.

    Rows of a batch are left-padded: row b's real tokens start at slot `pad[b]`, so every row shares one write
    position (`length`) and the decode step keeps fixed shapes. Each layer's buffer lives on that layer's device, and
    a pipeline stage holds buffers for its own layers only.
    """

    def __init__(self, layer_devices: dict[int, torch.device], batch: int, max_len: int, kv_lora_rank: int,
                 rope_dim: int, dtype: torch.dtype, pad: torch.Tensor | None = None):
        self.latent = {i: torch.zeros(batch, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device)
                       for i, device in layer_devices.items()}
        self.max_len = max_len
        self.length = 0
        self.pad = torch.zeros(batch, dtype=torch.long) if pad is None else pad.cpu()

    def layer(self, i: int) -> torch.Tensor:
        return self.latent[i]  # [B, max_len, kv_lora_rank + rope_dim], written in place

    def bytes_per_token_per_layer(self) -> int:
        any_layer = next(iter(self.latent.values()))
        return any_layer.shape[-1] * any_layer.element_size()

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.latent.values())
