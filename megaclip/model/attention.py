"""Core attention: torch's scaled_dot_product_attention, or flash-attn's kernel when a tower asks for it
(``use_flash_attention``) and it can run. flash-attn is optional (it builds only against CUDA): when it
cannot run, the run goes on with SDPA and says so once."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megaclip import distributed

try:
    from flash_attn import flash_attn_func
except ImportError:  # not installed (no CUDA build here); SDPA serves
    flash_attn_func = None

FLASH_DTYPES = (torch.bfloat16, torch.float16)
_said = set()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, causal: bool,
              use_flash_attention: bool) -> torch.Tensor:
    """q, k, v and the result are [batch, seq, heads, head_dim] (flash-attn's layout)."""
    if use_flash_attention:
        reason = flash_attention_unavailable(q)
        if reason is None:
            return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=causal)
        say_once(f"use_flash_attention: {reason}; using torch SDPA (its {sdpa_backend(q, dropout_p, causal)} kernel here)")
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         dropout_p=dropout_p, is_causal=causal)
    return out.transpose(1, 2)


def flash_attention_unavailable(q: torch.Tensor):
    """Why flash-attn's kernel cannot run on ``q``, or None when it can."""
    if flash_attn_func is None:
        return "flash-attn is not installed"
    if not q.is_cuda:
        return f"flash-attn runs on CUDA only, not on {q.device.type}"
    if q.dtype not in FLASH_DTYPES:
        return f"flash-attn needs bf16 or fp16 activations, not {str(q.dtype).removeprefix('torch.')}"
    return None


def sdpa_backend(q: torch.Tensor, dropout_p: float, causal: bool) -> str:
    """The kernel SDPA picks for these inputs. torch exposes its choice only through this private call
    (SDPA itself decides per call); named generically where a torch lacks it."""
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None:
        return "its own choice of"
    q = q.transpose(1, 2)
    return torch.nn.attention.SDPBackend(choose(q, q, q, dropout_p=dropout_p, is_causal=causal)).name.lower()


def say_once(message: str) -> None:
    """Print ``message`` on the main rank, the first time only (which kernel or backend runs)."""
    if message not in _said:
        _said.add(message)
        if distributed.is_main():
            print(message, flush=True)
