import torch


class LatentCache:
    """MLA's compressed KV cache: per layer and token only RMSNorm(c_kv) and the rotated shared rope key.

    Rows of a batch are left-padded: row b's real tokens start at slot `pad[b]`, so every row shares one write
    position (`length`) and the decode step keeps fixed shapes.
    """

    def __init__(self, n_layers: int, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype, device: torch.device | str, pad: torch.Tensor | None = None):
        self.latent = torch.zeros(n_layers, batch, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device)
        self.kv_lora_rank = kv_lora_rank
        self.length = 0
        self.pad = torch.zeros(batch, dtype=torch.long, device=device) if pad is None else pad.to(device)

    @property
    def max_len(self) -> int:
        return self.latent.shape[2]

    def layer(self, i: int) -> torch.Tensor:
        return self.latent[i]  # [B, max_len, kv_lora_rank + rope_dim], a view written in place

    def bytes_per_token_per_layer(self) -> int:
        return self.latent.shape[-1] * self.latent.element_size()
