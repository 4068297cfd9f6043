"""The architectures edgetune runs and what each adds to the llama block, read from GGUF metadata.

Each entry follows llama.cpp's graph for that `general.architecture` (src/models/*.cpp):

  llama, mistral   RMSNorm -> q,k,v -> RoPE (pairs 2i,2i+1) -> attention -> o; RMSNorm -> SiLU(gate)*up
                   -> down.  llama 3.x: a `rope_freqs` tensor divides each frequency (llama3 RoPE
                   scaling, written by the converter from rope_scaling's factor / low / high / original
                   context); edgetune reads the tensor, as llama.cpp does.
  qwen2            llama + q/k/v biases, RoPE on halves (neox).
  qwen3            llama, neox RoPE, RMSNorm over each q and k head before RoPE (attn_q_norm/attn_k_norm),
                   head size from attention.key_length (n_head * head_dim may differ from n_embd).
  gemma3           embedding * sqrt(n_embd); q/k head norms; post-attention and post-FFN RMSNorms
                   (post_attention_norm, post_ffw_norm) applied to the branch before the residual add;
                   GELU(tanh)(gate) * up; q scaled by 1/sqrt(attention.key_length); tied embeddings;
                   sliding-window layers (window attention.sliding_window, RoPE base rope.freq_base_swa)
                   interleaved with global layers (rope.freq_base).  Norm weights are used as stored:
                   Gemma's (1 + w) is already folded into the GGUF by the converter (llama.cpp reads them
                   as plain RMSNorm weights); the HF reader adds the 1 itself.
  phi3             fused attn_qkv [q; k; v] and ffn_up [gate; up] (SiLU(first half) * second half), neox
                   RoPE with per-dimension rope_factors_short / rope_factors_long (long when the context
                   exceeds rope.scaling.original_context_length) and rope.scaling.attn_factor on cos/sin.

Where llama.cpp hard-codes a value for an arch and newer files carry a key, the key wins and the
default is llama.cpp's: gemma3's window pattern (every 6th layer global:
attention.sliding_window_pattern) and SWA RoPE base (10000: rope.freq_base_swa).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    rope_mode: str                 # "normal" (llama pairs) | "neox" (halves)
    qk_norm: bool = False          # per-head RMSNorm of q and k before RoPE
    post_norms: bool = False       # gemma: RMSNorm on the attention/FFN branch before the residual
    embed_scale: bool = False      # gemma: token embeddings * sqrt(n_embd)
    act: str = "silu"              # gated FFN activation: "silu" | "gelu_tanh"
    fused: bool = False            # phi3: attn_qkv and ffn_up = [gate; up]
    swa_pattern: int = 0           # default sliding-window pattern when the window key is present
    rope_base_swa: float = 0.0     # default RoPE base of sliding-window layers


ARCHS = {
    "llama": Arch("normal"),
    "mistral": Arch("normal"),
    "qwen2": Arch("neox"),
    "qwen3": Arch("neox", qk_norm=True),
    "gemma3": Arch("neox", qk_norm=True, post_norms=True, embed_scale=True, act="gelu_tanh",
                   swa_pattern=6, rope_base_swa=10000.0),
    "phi3": Arch("neox", fused=True),
}
# plain llama blocks (what the ONNX builder writes); the C++ block (block.h) runs every arch above
BLOCK_ARCHS = ("llama", "mistral", "qwen2")

LLAMA_WEIGHTS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
FUSED_WEIGHTS = ("attn_qkv", "attn_output", "ffn_up", "ffn_down")


def layer_weights(arch: str) -> tuple:
    return FUSED_WEIGHTS if ARCHS[arch].fused else LLAMA_WEIGHTS


def layer_vectors(arch: str) -> tuple:
    """Per-layer norm vectors beyond attn_norm/ffn_norm, as GGUF names them."""
    a = ARCHS[arch]
    out = ()
    if a.qk_norm:
        out += ("attn_q_norm", "attn_k_norm")
    if a.post_norms:
        out += ("post_attention_norm", "post_ffw_norm")
    return out


def swa_layers(g, arch: str, n_layer: int) -> tuple:
    """Indices of sliding-window layers: none without attention.sliding_window (> 0); else from
    attention.sliding_window_pattern (an int n: layer i slides unless i % n == n - 1; or one bool
    per layer), else the arch's llama.cpp default pattern."""
    window = int(g.get(f"{arch}.attention.sliding_window", 0) or 0)
    if window <= 0:
        return ()
    pat = g.get(f"{arch}.attention.sliding_window_pattern", None)
    if isinstance(pat, (list, tuple)):
        if len(pat) != n_layer:
            from ..errors import FormatError
            raise FormatError(g.path, f"{arch}.attention.sliding_window_pattern has {len(pat)} "
                                      f"entries for {n_layer} layers")
        return tuple(i for i, s in enumerate(pat) if s)
    n = int(pat) if pat is not None else ARCHS[arch].swa_pattern
    # llama.cpp's set_swa_pattern(n): 0 = every layer slides, else layer i slides if i % n < n - 1
    return tuple(i for i in range(n_layer) if n == 0 or i % n < n - 1)
