"""An independent, deliberately plain re-statement of LlamaGen's c2i forward pass (raster order,
sequence-indexed 2D RoPE table with a zero row for the class token, causal attention), written from
the formulas in LlamaGen's gpt.py. Tests compare the project's GPT against it."""

import torch
import torch.nn.functional as F


def llamagen_freqs_cis_2d(grid_size: int, n_elem: int, base: float = 10000.0) -> torch.Tensor:
    half_dim = n_elem // 2
    freqs = 1.0 / (base ** (torch.arange(0, half_dim, 2)[: (half_dim // 2)].float() / half_dim))
    t = torch.arange(grid_size).float()
    freqs = torch.outer(t, freqs)
    freqs_grid = torch.concat([freqs[:, None, :].expand(-1, grid_size, -1),
                               freqs[None, :, :].expand(grid_size, -1, -1)], dim=-1)
    cache = torch.stack([torch.cos(freqs_grid), torch.sin(freqs_grid)], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(1, n_elem // 2, 2), cache])  # one class token


def _rope(x, freqs_cis):
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs_cis.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack([xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1],
                       xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)


def _rms(x, w, eps):
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def llamagen_forward(sd: dict, idx: torch.Tensor, cond: torch.Tensor, n_layer: int, n_head: int,
                     grid: int, eps: float = 1e-5) -> torch.Tensor:
    """LlamaGen training-mode logits [B, L, V] from a state dict: the class token predicts token 0,
    token i predicts token i + 1."""
    dim = sd["tok_embeddings.weight"].shape[1]
    hd = dim // n_head
    h = torch.cat([sd["cls_embedding.embedding_table.weight"][cond][:, None],
                   sd["tok_embeddings.weight"][idx[:, :-1]]], 1)
    B, T, _ = h.shape
    fc = llamagen_freqs_cis_2d(grid, hd)[:T]
    for i in range(n_layer):
        p = f"layers.{i}."
        x = _rms(h, sd[p + "attention_norm.weight"], eps)
        q, k, v = (x @ sd[p + "attention.wqkv.weight"].T).split([dim, dim, dim], -1)
        q = _rope(q.view(B, T, n_head, hd), fc).transpose(1, 2)
        k = _rope(k.view(B, T, n_head, hd), fc).transpose(1, 2)
        v = v.view(B, T, n_head, hd).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, dim)
        h = h + a @ sd[p + "attention.wo.weight"].T
        x = _rms(h, sd[p + "ffn_norm.weight"], eps)
        ff = (F.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (x @ sd[p + "feed_forward.w3.weight"].T))
        h = h + ff @ sd[p + "feed_forward.w2.weight"].T
    return (_rms(h, sd["norm.weight"], eps) @ sd["output.weight"].T).float()
