"""What a training loader saves and restores of itself: where the epoch stands, the layouts it went through, and
the bad samples met so far (`SplitLoader.state_dict` / `load_state_dict` delegate here).

The state is `{"layout": ..., "faults": ...}`: where the loader stands (the epoch, and the step it reached: the
batches it handed out, which it counts itself) in the layout the epoch is read in (ranks x workers x batch size x
drop_last x mix_shards), with the epoch's earlier layouts (`history`), written once per checkpoint (state.json, as
`data_layout`); and this rank's fault counts (its own file, as `data_faults`).

Resuming (see `pipeline.data.stream`, rule 6): in the layout the checkpoint was written at, the epoch goes on at
its step, bit-exactly, with this rank's counts. In another: with the samples that layout left unread, split over
this run's ranks (exact-once coverage; rank 0 takes over the old ranks' summed counts, so the epoch record is
whole). Checkpoints older than the layout record resume as before: same ranks, same layout assumed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from pipeline.data.plan import Layout
    from pipeline.data.stream import ShardStream

FAULTS = "data_faults"
"""The key of a rank's fault counts in the state it saves of its own (`Checkpointer.rank_states`)."""


@dataclass
class Continuation:
    """How a resumed loader goes on with the interrupted epoch."""

    step: int
    """Micro-batches of the epoch this rank has consumed in the current layout (0: the epoch restarts, or goes on
    with what another layout left unread)."""
    took_over: list[dict] = field(default_factory=list)
    """The saved rank states whose partial-epoch sums this rank continues with: its own, or (rank 0, after a layout
    change) every old rank's."""
    lines: list[str] = field(default_factory=list)
    """What to tell the user (main process)."""


def epoch_history(stream: ShardStream, epoch: int) -> tuple[Layout, ...]:
    """The layouts that read part of `epoch` before this one (set by a resume); () for an epoch begun here."""
    return stream.history if stream.epoch == epoch else ()


def start_epoch(loader, epoch: int) -> int:
    """Position the loader at the start of `epoch`, or where a resume left it in that epoch (its step, with the
    epoch's earlier layouts); the number of those layouts."""
    going_on = loader.stream.epoch == epoch
    history = epoch_history(loader.stream, epoch)
    loader.set_position(epoch, loader.step if going_on else 0, history)
    return len(history)


def state_dict(loader) -> dict:
    """The loader's state where it stands: `layout` (with the epoch, the step reached and the epoch's earlier
    layouts) and `faults` (this rank's counts)."""
    stream = loader.stream
    layout = asdict(stream.layout(loader.step))
    return {"layout": {**layout, "epoch": stream.epoch,
                       "history": [asdict(h) for h in epoch_history(stream, stream.epoch)]},
            "faults": loader.bad_samples.state_dict()["counts"]}


def load_state_dict(loader, state: dict, rank_states: Callable[[bool], list[dict]]) -> Continuation:
    """Resume at `state` = {"layout": what `state_dict` saved (None for old checkpoints), "world_size": of the
    writer, "epoch", "step": where the training loop stood, read only when the layout record lacks them (older
    checkpoints)}.

    `rank_states(every)`: the states the writer's ranks saved of their own (`FAULTS` and any partial sums): this
    rank's (every=False: [] when none was saved) or every rank's (every=True; [] on ranks that take none over)."""
    saved, history = _saved_layout(state.get("layout"))
    record = state.get("layout") or {}
    stream, epoch = loader.stream, record.get("epoch", state["epoch"])
    step = saved.step if saved else state["step"]
    if saved.reads_like(stream.layout()) if saved else state.get("world_size") == stream.world_size:
        loader.set_position(epoch, step, history)
        own = rank_states(False)
        _take_over(loader, own)
        return Continuation(step, own)
    if not step and not history:
        return Continuation(0)  # at an epoch boundary there is nothing to continue
    why = _cannot_continue(stream.elastic, saved, history)
    written = saved.describe() if saved else f"{state.get('world_size')} rank(s)"
    if why:
        loader.set_position(epoch, 0)
        return Continuation(0, lines=[f"the checkpoint was written at {written}, this run reads with "
                                      f"{stream.layout().describe()}: restarting epoch {epoch + 1} from its "
                                      f"beginning ({why})"])
    loader.set_position(epoch, 0, (*history, saved))
    old = rank_states(True)
    _take_over(loader, old)
    plan = stream.plan()
    return Continuation(0, old, [
        f"the checkpoint was written at {written}, step {saved.step}; this run reads with "
        f"{stream.layout().describe()}: continuing epoch {epoch + 1} with the {plan.total} "
        f"sample(s) it left unread, {stream.steps_per_epoch()} step(s) per rank",
        f"{plan.left_out()} sample(s) of the interrupted epoch are left out so every rank runs the same steps"])


def _take_over(loader, rank_states: list[dict]) -> None:
    """This epoch's fault counts so far: the sum of the given ranks' saved ones (kept when any is missing)."""
    faults = [r.get(FAULTS) for r in rank_states]  # bad samples met so far this epoch
    if faults and all(f is not None and f.shape == loader.bad_samples.total.shape for f in faults):
        loader.bad_samples.load_state_dict({"counts": sum(faults)})


def _saved_layout(record: Optional[dict]) -> tuple[Optional[Layout], tuple[Layout, ...]]:
    """The data layout a checkpoint was written at (with its step) and the epoch's earlier layouts; (None, ())
    for a checkpoint older than this record."""
    from pipeline.data.plan import Layout

    if not record:
        return None, ()
    fields = ("world_size", "workers", "batch_size", "drop_last", "step", "mix_shards")  # mix_shards: 1 if absent
    return (Layout(**{k: record[k] for k in fields if k in record}),
            tuple(Layout(**{k: h[k] for k in fields if k in h}) for h in record.get("history", [])))


def _cannot_continue(elastic: bool, saved: Optional[Layout], history: tuple[Layout, ...]) -> str:
    """Why an epoch cut in another layout must restart; '' when it can continue."""
    from pipeline.data.plan import MAX_HISTORY

    if not elastic:
        return "balanced sampling draws with replacement, so what was read is no set of samples"
    if saved is None:
        return "the checkpoint does not record its data layout"
    if len(history) >= MAX_HISTORY:
        return f"the epoch already went through {MAX_HISTORY} earlier layouts"
    return ""
