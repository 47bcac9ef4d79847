"""P1 start latency, and the peers (bubblewrap, podman+crun) on the same measure.

Launch (``AsyncKernelManager.start_kernel`` called) to the first ``kernel_info_reply`` on a
fresh client, and to the first ``status`` message on iopub (the kernel is usable without the
slow-joiner loss of output). The variants of one image start in turn, the order rotated each
round; every ratio is per round (same run, interleaved).

Note: ``start_kernel`` of the sandbox provisioner returns only after its own client saw the
kernel's first kernel_info_reply (post_launch applies the deferred CPU cap then), so the
sandboxed figure includes that client's zmq reconnect interval (100 ms default) plus a
second connection; the other variants return at once and our client (5 ms reconnect) polls.
"""

from __future__ import annotations

import sys

from .kernels import Harness, Kernel
from .stats import Figure, ratio

P1_LIMIT = 1.05


async def _one(h: Harness, spec: str) -> tuple[float, float, float]:
    k: Kernel = await h.start(spec)
    try:
        reply, iopub = await k.ready()
    finally:
        await k.stop()
    return reply * 1000, iopub * 1000, k.started * 1000


Series = dict[str, tuple[list[float], list[float], list[float]]]


def phase_figures(tag: str, starts: list[dict[str, float]]) -> list[Figure]:
    """One figure per start phase the provisioner traced (``runtime/phases.py``), in the
    order of the first start: where the sandbox's part of a cold start goes. The warm-up
    start is left out, as in the other figures."""
    measured = starts[1:] if len(starts) > 1 else starts
    names = list(measured[0]) if measured else []
    return [
        Figure(f"{tag} phase: {name}", "ms", [run[name] for run in measured if name in run])
        for name in names
    ]


async def _series(h: Harness, specs: list[str], rounds: int, warmup: bool = True) -> Series:
    out: dict[str, tuple[list[float], list[float], list[float]]] = {s: ([], [], []) for s in specs}
    peers = [s for s in specs if s.startswith(("bwrap-", "podman-"))]
    for s in list(specs) if warmup else peers:  # warm-up: page cache, image snapshots, podman
        try:
            await _one(h, s)
        except Exception as exc:
            if s.startswith(("bwrap-", "podman-")):  # a peer that cannot run here: say why
                print(f"  {s}: {exc}", file=sys.stderr)
                h.failures[s] = str(exc)
                specs.remove(s)
                del out[s]
                continue
            raise
    for r in range(rounds):
        order = specs[r % len(specs) :] + specs[: r % len(specs)]
        for s in order:
            for series, value in zip(out[s], await _one(h, s), strict=True):
                series.append(value)
    return out


async def measure(
    h: Harness,
    rounds: int = 8,
    peers: bool = True,
    warmup: bool = True,
    notes: list[str] | None = None,
) -> list[Figure]:
    notes = notes if notes is not None else []
    figs: list[Figure] = []
    # ---- Python 3 ----
    nomagics = h.sandbox_variant("python3-sandbox", "nomagics", magics=False)
    specs = ["python3-sandbox", "bare-python3", h.chroot_spec("python3"), nomagics]
    if peers:
        specs.append(h.bwrap_spec("python3"))
        try:
            specs.append(h.podman_spec("python3"))
        except Exception as exc:
            notes.append(f"podman peer not measured: {exc}")
            print(f"  podman: {exc}", file=sys.stderr)
    data = await _series(h, specs, rounds, warmup)
    notes.extend(h.notes)
    for s, why in h.failures.items():
        log = (h.root / "kernels.log").read_text(errors="replace").strip().splitlines()[-3:]
        notes.append(f"peer {s} not measured: {why}; kernel log: {' | '.join(log)}")
    label = {
        "python3-sandbox": "sandbox",
        nomagics: "sandbox without %sandbox magics",
        "bare-python3": "bare host",
        "chroot-python3": "chroot",
        "bwrap-python3": "bwrap",
        "podman-python3": f"podman+{h.podman_runtime}",
    }
    for s in specs:
        figs.append(Figure(f"P1 py3 {label[s]}: launch -> kernel_info_reply", "ms", data[s][0]))
        figs.append(Figure(f"P1 py3 {label[s]}: launch -> iopub status", "ms", data[s][1]))
    figs.extend(phase_figures("P1 py3 sandbox", h.phases.get("python3-sandbox", [])))
    figs.append(
        Figure(
            "P1 py3 sandbox: launch -> start_kernel returned (incl. provisioner's own wait)",
            "ms",
            data["python3-sandbox"][2],
        )
    )
    sb = data["python3-sandbox"]
    figs.append(
        ratio(
            "P1 py3 ratio sandbox/bare host (iopub ready)",
            sb[1],
            data["bare-python3"][1],
            target="<= 1.05",
            limit=P1_LIMIT,
        )
    )
    figs.append(
        ratio("P1 py3 ratio sandbox/bare host (kernel_info)", sb[0], data["bare-python3"][0])
    )
    figs.append(
        ratio(
            "P1 py3 ratio sandbox/chroot (pure sandbox overhead)",
            sb[1],
            data["chroot-python3"][1],
            target="<= 1.05",
            limit=P1_LIMIT,
        )
    )
    figs.append(
        ratio(
            "P1 py3 ratio sandbox-without-magics/chroot",
            data[nomagics][1],
            data["chroot-python3"][1],
            note="the extension's share of the overhead",
        )
    )
    for peer in ("bwrap-python3", "podman-python3"):
        if peer in data:
            figs.append(
                ratio(
                    f"P1 py3 ratio sandbox/{label[peer]} (peer)",
                    sb[1],
                    data[peer][1],
                    target="<= 1.0",
                    limit=1.0,
                )
            )
            figs.append(
                ratio(
                    f"P1 py3 ratio {label[peer]}/chroot (peer)",
                    data[peer][1],
                    data["chroot-python3"][1],
                )
            )
    # ---- Python 2.7: no host equivalent (no python2.7 ipykernel on the host) ----
    specs2 = ["python2.7-sandbox", h.chroot_spec("python2.7")]
    data2 = await _series(h, specs2, rounds, warmup)
    figs.append(Figure("P1 py2.7 sandbox: launch -> iopub status", "ms", data2[specs2[0]][1]))
    figs.append(Figure("P1 py2.7 chroot: launch -> iopub status", "ms", data2[specs2[1]][1]))
    figs.extend(phase_figures("P1 py2.7 sandbox", h.phases.get("python2.7-sandbox", [])))
    figs.append(
        ratio(
            "P1 py2.7 ratio sandbox/chroot (pure sandbox overhead)",
            data2[specs2[0]][1],
            data2[specs2[1]][1],
            target="<= 1.05",
            limit=P1_LIMIT,
        )
    )
    notes.append(
        "P1 py2.7 vs a bare host kernel: not measurable, the host has no Python 2.7 ipykernel; "
        "the chroot baseline (same image, no namespaces) stands for it"
    )
    return figs
