"""How the demo prints a result: tokens coloured by their exit layer (``rich`` when installed, else ANSI)."""

from __future__ import annotations

from typing import Sequence, TextIO

from .result import DATA, TASK_TITLE, DemoResult

__all__ = ["pieces", "print_result"]

def pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each generated token adds (decoding prefixes, so SentencePiece spaces come out right)."""
    out, prev = [], ""
    for i in range(1, len(ids) + 1):
        cur = tokenizer.decode(ids[:i], skip_special_tokens=True)
        out.append(cur[len(prev):] if cur.startswith(prev) else cur)
        prev = cur
    return out


_PALETTE = (46, 82, 118, 154, 190, 226, 220, 214, 208, 202, 196)  # ANSI 256: green -> red


def _layer_color(layer: int, num_layers: int) -> int:
    frac = (layer - 1) / max(num_layers - 1, 1)
    return _PALETTE[round(frac * (len(_PALETTE) - 1))]


def _render_tokens(pieces, layers, num_layers, color: bool, use_rich: bool) -> str:
    if not color:
        return "".join(f"{p}⟨{l}⟩" if p.strip() else p for p, l in zip(pieces, layers))
    if use_rich:
        from rich.text import Text

        text = Text()
        for p, l in zip(pieces, layers):
            text.append(p, style=f"bold color({_layer_color(l, num_layers)})")
        return text
    return "".join(f"\x1b[1;38;5;{_layer_color(l, num_layers)}m{p}\x1b[0m" for p, l in zip(pieces, layers))


def _legend(num_layers: int, color: bool, use_rich: bool):
    if not color:
        return f"(⟨n⟩ after a token = the decoder layer it exited at, of {num_layers})"
    if use_rich:
        from rich.text import Text

        text = Text("exit layer: ")
        for l in range(1, num_layers + 1):
            text.append(f" {l} ", style=f"bold black on color({_layer_color(l, num_layers)})")
        text.append(f"  ({num_layers} = full depth)")
        return text
    return "exit layer: " + "".join(f"\x1b[1;30;48;5;{_layer_color(l, num_layers)}m {l} \x1b[0m"
                                    for l in range(1, num_layers + 1)) + f"  ({num_layers} = full depth)"


def print_result(r: DemoResult, out: TextIO, color: bool, use_rich: bool) -> None:
    title = TASK_TITLE.get(r.task, r.task)
    line = "─" * 78
    if use_rich:
        from rich.console import Console

        console = Console(file=out, force_terminal=True, color_system="256", highlight=False, soft_wrap=True)
        emit = console.print
    else:
        def emit(obj=""):
            print(obj, file=out)
    emit(line)
    emit(r.shown_input)
    emit(f"{title} ({r.task}) with early exit at λ̂ = {r.threshold:.4g} "
         f"[{r.extra['method']}, {r.extra['measure']} confidence; calibration {r.calibration_source}]")
    if r.eps_reason:
        emit(f"Target: {r.eps_reason}.")
    emit(_render_tokens(r.pieces, r.exit_layers, r.num_layers, color, use_rich) or "(empty output)")
    emit(_legend(r.num_layers, color, use_rich))
    emit(f"Full model:  {r.full_text or '(empty output)'}")
    same = "identical to" if r.text == r.full_text else "differs from"
    emit(f"Mean exit layer {r.mean_exit_layer:.2f} of {r.num_layers} "
         f"({100 * r.mean_exit_layer / r.num_layers:.0f}% of the decoder); output {same} the full model's.")
    n = max(r.new_tokens_early, 1)
    emit(f"Time for the same {n} generated tokens (encoder included): {r.time_early * 1000:.1f} ms with early "
         f"exit, {r.time_full * 1000:.1f} ms with the full model (HF generate made to emit {n} tokens) → "
         f"speed-up {r.speedup:.2f}× on this input, this tiny model ({r.time_early * 1000 / n:.1f} vs "
         f"{r.time_full * 1000 / n:.1f} ms/token; real T5 shapes: docs/benchmarks.md).")
    emit(f"Guarantee: {r.guarantee}")
    emit(f"  (It is a statement about inputs drawn like the calibration data, {DATA.get(r.task, r.task)}; "
         "a text of another kind is outside it.)")
