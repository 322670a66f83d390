"""The Ray executor: a run's work spread over the GPUs of one machine or of a cluster.

The driver (the `arena run` process) plans the grid as the local executor does and stays
the single writer of the ledger. The work of a group, one (model, concept, defense), is cut
into shards: the latency probe, one batch of cases to attack, or one batch of images to
generate and judge. Each Ray actor holds one loaded defended model (a `CellWorker`) and
runs shards for it, so a model loads once per actor, not once per shard. An actor whose
group has no shard waiting loads the group with the most waiting work per actor.

The driver waits on the outstanding shards (`ray.wait`) and writes each finished shard's
rows through the runner's own write methods, as the local executor does. Resume therefore
works across executors: the ledger's image keys decide what is left, whichever executor
wrote them.

When an actor dies (its process or its node is lost), the driver loses only the shard that
actor was running. It starts another actor and resubmits that shard, at most
`runner.ray.max_retries` times per shard. Rows are written only for finished shards, and a
finished shard is never resubmitted, so no row is lost or written twice.

Ray is an optional dependency (`pip install 'erasure-arena[ray]'`), imported only when this
executor runs.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from harness.config import ConfigError, PluginRef, RayConfig, RunConfig
from harness.ledger import Ledger
from harness.prompts.base import Case
from harness.runner import (
    Group,
    Runner,
    batched,
    cell_key,
    resolve_device,
    resolve_dtype,
)
from harness.worker import CellWorker, ImageJob, load_model, make_evaluator

log = logging.getLogger(__name__)


class ShardLostError(RuntimeError):
    """A shard lost more actors than `runner.ray.max_retries` allows."""


def import_ray():
    """Return the `ray` module; raise a ConfigError with the install command when it is missing."""
    try:
        import ray
    except ModuleNotFoundError:
        raise ConfigError(
            "config error: runner.executor: ray is not installed;"
            " install it with pip install 'erasure-arena[ray]'"
        ) from None
    return ray


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


class ShardActor:
    """The remote side: a `CellWorker` for one group at a time, on the device Ray gave it.

    The base model stays loaded while the actor moves between groups of the same model,
    and the judge while it moves between groups of the same concept.
    """

    def __init__(self, config: RunConfig, cwd: str, die_on_shard: int | None = None) -> None:
        # Relative paths in a config (prompt files, weights) are relative to the folder
        # `arena run` started in; on a shared file system that folder exists here too.
        if os.path.isdir(cwd):
            os.chdir(cwd)
        self.config = config
        self.device = resolve_device(config.runner.device)
        self.dtype = resolve_dtype(config.runner.dtype, self.device)
        self.die_on_shard = die_on_shard
        self.shards_started = 0
        self.worker: CellWorker | None = None
        self.base: tuple[str, Any] | None = None
        self.evaluator: tuple[str, Any] | None = None

    def load(self, group: Group, attacks: list[PluginRef]) -> dict[str, Any]:
        """Build the group's worker; return what the driver needs to plan its shards."""
        self.worker = None
        model_key = group.model_ref.key
        if self.base is None or self.base[0] != model_key:
            # Release the previous model before loading the next one onto the same device.
            self.base = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            model = load_model(self.config, group.model_ref, self.device, self.dtype)
            self.base = (model_key, model)
        if self.evaluator is None or self.evaluator[0] != group.concept.name:
            self.evaluator = (group.concept.name, make_evaluator(group.concept))

        worker = CellWorker(
            self.config,
            group.model_ref,
            group.concept,
            group.defense_ref,
            self.device,
            self.dtype,
            base=self.base[1],
            evaluator=self.evaluator[1],
        )
        self.worker = worker
        return {
            "sampler": worker.sampler,
            "settings": {ref.key: worker.cell_settings(ref) for ref in attacks},
            "attack_hash": {
                ref.key: worker.attack_hash(ref) for ref in attacks if ref.key != "none"
            },
            "device": self.where(),
        }

    def where(self) -> dict[str, Any]:
        """The node and device this actor runs on."""
        import ray

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "node": ray.util.get_node_ip_address(),
            "hostname": platform.node(),
            "device": str(self.device),
            "device_name": _device_name(self.device),
            "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
            "pid": os.getpid(),
        }

    def probe(self, cases: tuple[Case, ...], count: int) -> list[dict[str, Any]]:
        self._start_shard()
        return self.worker.probe_latency(cases, count)

    def attack(self, attack_ref: PluginRef, cases: tuple[Case, ...]) -> list[dict[str, Any]]:
        self._start_shard()
        return self.worker.run_attack(attack_ref, cases)

    def generate(self, jobs: tuple[ImageJob, ...], texts: tuple[str, ...]) -> list:
        self._start_shard()
        return self.worker.generate(jobs, texts)

    def _start_shard(self) -> None:
        self.shards_started += 1
        if self.die_on_shard is not None and self.shards_started == self.die_on_shard:
            # Test-only fault: the process exits with its shard in flight, as on a lost node.
            os._exit(1)


@dataclass
class _Shard:
    """One remote call on a loaded group; `attempts` counts the actors lost running it."""

    kind: str  # "probe", "attack" or "images"
    attack_ref: PluginRef | None = None
    cases: tuple[Case, ...] = ()
    jobs: tuple[ImageJob, ...] = ()
    texts: tuple[str, ...] = ()
    count: int = 0
    attempts: int = 0


@dataclass
class _GroupState:
    """The driver's view of one group: its plan once an actor loaded it, and what is left.

    A group is finished when each of its cells has all its images and no shard is waiting
    or running. `info` (sampler settings, cell settings, attack hashes) comes from the
    first actor that loads the group; the shards are planned from it.
    """

    group: Group
    info: dict[str, Any] | None = None
    loading: bool = False
    ready: deque[_Shard] = field(default_factory=deque)
    running: int = 0
    cells_left: set[str] = field(default_factory=set)
    todo: dict[str, list[ImageJob]] = field(default_factory=dict)
    prompts: dict[str, dict[str, str]] = field(default_factory=dict)
    attack_shards_left: dict[str, int] = field(default_factory=dict)
    image_shards_left: dict[str, int] = field(default_factory=dict)
    generated: dict[str, int] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.info is not None and not self.cells_left and not self.ready and not self.running


@dataclass
class _Actor:
    """One Ray actor as the driver tracks it."""

    index: int
    handle: Any
    state: _GroupState | None = None
    busy: bool = False
    lost: bool = False
    shards: int = 0
    device: dict[str, Any] | None = None
    groups: list[str] = field(default_factory=list)


class RayExecutor:
    """Runs a `Runner`'s grid on Ray actors while the driver writes the ledger.

    `die_on_shard` is a test-only fault: the first actor started exits its process when
    its N-th shard starts, so tests can check that a lost actor loses no rows.
    """

    def __init__(self, settings: RayConfig, *, die_on_shard: int | None = None) -> None:
        self.settings = settings
        self.die_on_shard = die_on_shard
        self.started_ray = False
        self.info: dict[str, Any] = {}
        self.actors: list[_Actor] = []
        self.started_actors: list[_Actor] = []
        self.in_flight: dict[Any, tuple[_Actor, _GroupState, _Shard | None]] = {}
        self.retried = 0

    # -- the cluster ---------------------------------------------------------------------

    def connect(self) -> dict[str, Any]:
        """Start or join Ray, size the actors; return the executor's part of the environment."""
        ray = import_ray()
        if not ray.is_initialized():
            ray.init(address=self.settings.address, include_dashboard=False)
            self.started_ray = True
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0.0)
        cpus = resources.get("CPU", 0.0)

        num_gpus = self.settings.num_gpus_per_actor
        if num_gpus is None:
            num_gpus = 1.0 if gpus > 0 else 0.0
        num_cpus = self.settings.num_cpus_per_actor
        # A request no node can meet would leave the actors pending forever.
        if num_gpus > gpus:
            raise ConfigError(
                f"config error: runner.ray.num_gpus_per_actor: {num_gpus} requested,"
                f" the Ray cluster has {gpus:g} GPUs"
            )
        if num_cpus > cpus:
            raise ConfigError(
                f"config error: runner.ray.num_cpus_per_actor: {num_cpus} requested,"
                f" the Ray cluster has {cpus:g} CPUs"
            )
        max_actors = self.settings.max_actors
        if max_actors is None:
            if num_gpus > 0:
                max_actors = int(gpus // num_gpus)
            elif num_cpus > 0:
                max_actors = int(cpus // num_cpus)
            else:
                max_actors = int(cpus)
        self.num_gpus, self.num_cpus, self.max_actors = num_gpus, num_cpus, max(1, max_actors)
        self.remote_class = ray.remote(ShardActor)

        nodes = [node for node in ray.nodes() if node.get("Alive")]
        self.info = {
            "name": "ray",
            "ray_version": ray.__version__,
            "address": self.settings.address or "local",
            "nodes": len(nodes),
            "cluster": {"CPU": cpus, "GPU": gpus},
            "num_gpus_per_actor": num_gpus,
            "num_cpus_per_actor": num_cpus,
            "max_actors": self.max_actors,
        }
        log.info(
            "ray %s: %d node(s), %g CPUs, %g GPUs; up to %d actors of %g GPU and %g CPU",
            ray.__version__,
            len(nodes),
            cpus,
            gpus,
            self.max_actors,
            num_gpus,
            num_cpus,
        )
        return dict(self.info)

    def describe(self) -> dict[str, Any]:
        """The environment entry after a run: the cluster, plus every actor and its device."""
        actors = [
            {
                "actor": actor.index,
                **(actor.device or {}),
                "groups": actor.groups,
                "shards": actor.shards,
                "lost": actor.lost,
            }
            for actor in self.started_actors
        ]
        devices = [
            {key: actor[key] for key in ("node", "hostname", "device", "device_name", "gpu_ids")}
            for actor in actors
            if "device" in actor
        ]
        return {
            **self.info,
            "actors": actors,
            "devices": devices,
            "actors_lost": sum(actor["lost"] for actor in actors),
            "shards_retried": self.retried,
        }

    def close(self) -> None:
        """Stop this run's actors, and Ray itself when this executor started it."""
        if not self.actors and not self.started_ray:
            return
        ray = import_ray()
        for actor in self.actors:
            ray.kill(actor.handle)
        self.actors = []
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False

    # -- the run -------------------------------------------------------------------------

    def run_grid(self, runner: Runner, ledger: Ledger) -> None:
        """Run every group that still has work; return when all are in the ledger."""
        ray = import_ray()
        self.runner, self.ledger = runner, ledger
        disable = not runner.progress
        self.cells_bar = tqdm(total=runner.cell_count(), desc="cells", unit="cell", disable=disable)
        self.images_bar = tqdm(total=0, desc="images", unit="img", leave=False, disable=disable)
        self.attack_bar = tqdm(total=0, desc="attack", unit="case", leave=False, disable=disable)

        self.groups: list[_GroupState] = []
        for group, done in runner.plan_groups(ledger):
            if done:
                self.cells_bar.update(len(group.attacks))
            else:
                self.groups.append(_GroupState(group))

        try:
            while not all(state.finished for state in self.groups):
                self._schedule()
                if not self.in_flight:
                    raise RuntimeError("the Ray executor has unfinished groups but no work running")
                [ref], _ = ray.wait(list(self.in_flight), num_returns=1)
                actor, state, shard = self.in_flight.pop(ref)
                actor.busy = False
                try:
                    value = ray.get(ref)
                except ray.exceptions.RayActorError as error:
                    self._lose(actor, state, shard, error)
                    continue
                self._finish(actor, state, shard, value)
        finally:
            for bar in (self.attack_bar, self.images_bar, self.cells_bar):
                bar.close()

    # -- scheduling ----------------------------------------------------------------------

    def _schedule(self) -> None:
        """Give every idle actor work, and start actors while work has none."""
        for actor in self.actors:
            if not actor.busy:
                self._give_work(actor)
        while len(self.actors) < self.max_actors and self._group_to_load() is not None:
            self._give_work(self._start_actor())

    def _give_work(self, actor: _Actor) -> None:
        """A shard of the actor's group if one waits, else the load of another group."""
        state = actor.state
        if state is not None and state.ready:
            shard = state.ready.popleft()
            state.running += 1
            self._submit(actor, state, shard)
            return

        target = self._group_to_load()
        if target is None:
            return
        if target.info is None:
            target.loading = True
        actor.state = target
        actor.groups.append("|".join(target.group.names))
        self._submit(actor, target, None)

    def _group_to_load(self) -> _GroupState | None:
        """A group not yet planned, else the group with the most waiting shards per actor.

        A group is worth loading only while it has more waiting shards than actors that
        hold it (those actors take its shards as they finish).
        """
        for state in self.groups:
            if state.info is None and not state.loading:
                return state
        best, best_rank = None, None
        for state in self.groups:
            if state.info is None or not state.ready:
                continue
            holders = sum(1 for actor in self.actors if actor.state is state)
            if len(state.ready) <= holders:
                continue
            rank = (holders, -len(state.ready))
            if best_rank is None or rank < best_rank:
                best, best_rank = state, rank
        return best

    def _start_actor(self) -> _Actor:
        # The test-only fault goes to the first actor only, so its replacement survives.
        die_on_shard = self.die_on_shard if not self.started_actors else None
        handle = self.remote_class.options(
            num_gpus=self.num_gpus, num_cpus=self.num_cpus, max_restarts=0
        ).remote(self.runner.config, os.getcwd(), die_on_shard)
        actor = _Actor(index=len(self.started_actors), handle=handle)
        self.actors.append(actor)
        self.started_actors.append(actor)
        log.info("started Ray actor %d", actor.index)
        return actor

    def _submit(self, actor: _Actor, state: _GroupState, shard: _Shard | None) -> None:
        remote = actor.handle
        if shard is None:
            ref = remote.load.remote(state.group, list(state.group.attacks))
        elif shard.kind == "probe":
            ref = remote.probe.remote(shard.cases, shard.count)
        elif shard.kind == "attack":
            ref = remote.attack.remote(shard.attack_ref, shard.cases)
        else:
            ref = remote.generate.remote(shard.jobs, shard.texts)
        actor.busy = True
        self.in_flight[ref] = (actor, state, shard)

    # -- results -------------------------------------------------------------------------

    def _finish(self, actor: _Actor, state: _GroupState, shard: _Shard | None, value) -> None:
        """Write a finished call's rows and queue the work it unblocks."""
        runner, ledger = self.runner, self.ledger
        if shard is None:
            actor.device = value["device"]
            if state.info is None:
                state.info = value
                state.loading = False
                self._plan(state)
            return

        actor.shards += 1
        state.running -= 1
        if shard.kind == "probe":
            ledger.add_timings(value)
            return

        attack_ref = shard.attack_ref
        if shard.kind == "attack":
            attack_hash = state.info["attack_hash"][attack_ref.key]
            written = runner.write_prompts(ledger, state.group, attack_ref, attack_hash, value)
            state.prompts[attack_ref.key].update(written)
            self.attack_bar.update(len(shard.cases))
            state.attack_shards_left[attack_ref.key] -= 1
            if state.attack_shards_left[attack_ref.key] == 0:
                self._queue_images(state, attack_ref)
            return

        names = state.group.cell_names(attack_ref.key)
        runner.write_images(ledger, cell_key(*names), names, value)
        self.images_bar.update(len(value))
        state.image_shards_left[attack_ref.key] -= 1
        if state.image_shards_left[attack_ref.key] == 0:
            self._cell_done(state, attack_ref)

    def _lose(self, actor: _Actor, state: _GroupState, shard: _Shard | None, error) -> None:
        """Drop a dead actor and put its shard back in its group's queue."""
        ray = import_ray()
        actor.lost = True
        self.actors.remove(actor)
        # An actor that is only unreachable may come back; kill it so it frees its GPU.
        ray.kill(actor.handle)
        what = "a group load" if shard is None else f"a {shard.kind} shard"
        log.warning(
            "Ray actor %d lost during %s of %s: %s",
            actor.index,
            what,
            "|".join(state.group.names),
            str(error).splitlines()[0] if str(error) else type(error).__name__,
        )
        if shard is None:
            if state.info is None:
                state.loading = False
            return

        state.running -= 1
        shard.attempts += 1
        if shard.attempts > self.settings.max_retries:
            raise ShardLostError(
                f"{what} of {'|'.join(state.group.names)} lost {shard.attempts} actors;"
                f" giving up (runner.ray.max_retries is {self.settings.max_retries})"
            ) from error
        self.retried += 1
        state.ready.appendleft(shard)

    # -- planning a loaded group ---------------------------------------------------------

    def _plan(self, state: _GroupState) -> None:
        """Record the group's cells and queue its probe, attack and image shards."""
        runner, ledger, group, info = self.runner, self.ledger, state.group, state.info
        count = runner.probe_count(ledger, group)
        if count:
            state.ready.append(_Shard("probe", cases=group.cases, count=count))

        for attack_ref in group.attacks:
            settings = info["settings"][attack_ref.key]
            _, _, todo = runner.open_cell(ledger, group, attack_ref, info["sampler"], settings)
            if not todo:
                self.cells_bar.update(1)
                continue
            state.cells_left.add(attack_ref.key)
            state.todo[attack_ref.key] = todo
            self.images_bar.total += len(todo)
            self.images_bar.refresh()

            attack_hash = info["attack_hash"].get(attack_ref.key)
            prompts, cases = runner.cached_prompts(ledger, group, attack_ref, attack_hash)
            state.prompts[attack_ref.key] = prompts
            if not cases:
                self._queue_images(state, attack_ref)
                continue
            batches = batched(cases, runner.config.runner.attack_batch_size)
            state.attack_shards_left[attack_ref.key] = len(batches)
            self.attack_bar.total += len(cases)
            self.attack_bar.refresh()
            for batch in batches:
                state.ready.append(_Shard("attack", attack_ref=attack_ref, cases=tuple(batch)))

    def _queue_images(self, state: _GroupState, attack_ref: PluginRef) -> None:
        """Queue a cell's image shards, once every case has its text."""
        todo = state.todo.pop(attack_ref.key)
        prompts = state.prompts[attack_ref.key]
        batches = batched(todo, self.runner.config.runner.batch_size)
        state.image_shards_left[attack_ref.key] = len(batches)
        state.generated[attack_ref.key] = len(todo)
        for batch in batches:
            texts = tuple(prompts[job.case.case_id] for job in batch)
            state.ready.append(
                _Shard("images", attack_ref=attack_ref, jobs=tuple(batch), texts=texts)
            )

    def _cell_done(self, state: _GroupState, attack_ref: PluginRef) -> None:
        state.cells_left.discard(attack_ref.key)
        self.cells_bar.update(1)
        key = cell_key(*state.group.cell_names(attack_ref.key))
        log.info("cell %s: %d images generated", key, state.generated[attack_ref.key])
