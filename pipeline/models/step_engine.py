"""The step engine: optimizer steps made inside one Lightning call, with no host synchronisation.

`VAEModule.training_step` receives a list of K batches and hands each to `StepEngine.step`, which
makes exactly the optimizer step Lightning's automatic optimisation would, minus its per-step
costs (bench/pipeline_overhead.py):
- noise from one generator reseeded per step with (seed, step, rank): the same draws whatever K
  or wherever a run was interrupted, without building a generator per step;
- non-finite loss or gradients found on the device (one fused check over all gradients, as AMP
  does) and the update skipped by the fused optimizer's `found_inf` input, parameters and moments
  untouched; the counts stay on the device until they are logged;
- under DDP the gradients (and the loss's finiteness) are averaged in one all-reduce per step,
  issued here: Lightning's DDP wrapper expects one backward per forward, and a call makes K;
- optionally the step's mathematics compiled (`torch.compile`), its noise drawn outside and passed
  in, with an eager fallback that says so once;
- on one CUDA GPU (trainer.cuda_graph) the whole optimizer step — compiled forward and backward,
  non-finite check, clipping, fused Adam, counters — captured once as one CUDA graph and replayed
  each step: per step the host only draws the noise, copies the batch in and launches the graph.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from pipeline.data.stream import derived_seed


def make_optimizer(params, o) -> torch.optim.Optimizer:
    """The configured optimizer, fused: one kernel per step, and the `found_inf` input that skips a
    step on the device (the bare loop's default Adam runs ~4x slower on CPU)."""
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.betas[0], weight_decay=o.weight_decay, fused=True)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, fused=True)


class StepEngine:
    def __init__(self, module, optimizer: torch.optim.Optimizer, scheduler=None, *, clip_val: float | None = None,
                 precision: str = "32-true", compile_mode: str | None = None, cuda_graph: bool = False):
        self.module, self.opt, self.sched, self.clip_val = module, optimizer, scheduler, clip_val
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        device = self.params[0].device
        zero = torch.zeros((), device=device)
        self.found, self.one = zero.clone(), torch.ones((), device=device)
        # Device-side counters, read only when logged: skipped steps in all, the current run of
        # skipped steps, the longest run since the last check, whether the last skip was the loss.
        self.counters = tuple(zero.clone() for _ in range(4))
        self.skipped, self.run, self.longest, self.loss_bad = self.counters
        self.scaler = torch.amp.GradScaler(device.type) if str(precision).startswith("16") else None
        if isinstance(optimizer, torch.optim.SGD):
            # Fused SGD creates its momentum buffers uninitialised at its first step and fills them
            # only if that step is taken: a skipped first step (non-finite) would leave garbage.
            # Zeros give the first real step's buffer = gradient, as SGD's own first step does.
            for group in optimizer.param_groups:
                if group["momentum"]:
                    for p in group["params"]:
                        optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
        self.gen = torch.Generator(device=device)
        self.compiled = None
        self.beta_t = zero.clone()  # beta as a device tensor for the compiled step: a float input would
        # be recompiled for every value of a warm-up, or kept on the CPU, which CUDA graphs refuse
        # The whole-step graph needs the compiled step without its own CUDA graphs (they do not nest),
        # no GradScaler (its scale is read on the host) and Adam/AdamW (fused SGD decides its first
        # step on the host). `cuda_graph` from the caller: asked for, and one process.
        self.cuda_graph = (cuda_graph and device.type == "cuda" and compile_mode is not None and self.scaler is None
                           and isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)))
        self.graph: torch.cuda.CUDAGraph | None = None
        if compile_mode is not None:
            mode = "default" if self.cuda_graph else compile_mode
            self.compiled = torch.compile(self._terms_from_noise, mode=mode, dynamic=False)

    # --- the objective ----------------------------------------------------------------------------

    def _terms_from_noise(self, x, eps, beta):
        return self.module.training_terms(x, beta, None, eps=eps)

    def noise(self, x: torch.Tensor, step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor | None:
        """This rank's slice of the step's noise, drawn for the whole global batch from (seed, step),
        so the run does not depend on how many ranks share the batch (None: the model draws its own)."""
        self.gen.manual_seed(derived_seed(self.module.cfg.run.seed, "train", step))
        return self.module.step_noise(x.shape[0], rank, world_size, self.gen)

    def terms(self, x: torch.Tensor, beta: float, step: int, rank: int, world_size: int = 1) -> dict:
        """The step's terms, compiled where asked, from the step's noise."""
        eps = self.noise(x, step, rank, world_size)
        if self.compiled is None or eps is None:
            return self.module.training_terms(x, beta, self.gen if eps is None else None, eps=eps)
        try:
            return self.compiled(x, eps, self.beta_t.fill_(beta))
        except Exception as err:  # inductor needs a working toolchain; eager is always right
            print(f"note: torch.compile of the training step failed ({type(err).__name__}: "
                  f"{str(err).splitlines()[0][:200] if str(err) else ''}); training eagerly (model.compile=false "
                  "skips the attempt)", file=sys.stderr)
            self.compiled = None
            return self.module.training_terms(x, beta, None, eps=eps)

    # --- one optimizer step -----------------------------------------------------------------------

    def step(self, x: torch.Tensor, step: int, beta: float, rank: int = 0, world_size: int = 1,
             fault: str | None = None) -> dict:
        if self.cuda_graph and fault is None:
            terms = self._graphed_step(x, step, beta)
            if terms is not None:
                return terms
        terms = self.terms(x, beta, step, rank, world_size)
        loss = terms["loss"]
        if fault == "NAN":
            loss = loss * float("nan")
        self._update(loss, world_size, fault)
        if self.scaler is not None:
            self.scaler.update()
        if self.sched is not None:
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return terms

    def _update(self, loss: torch.Tensor, world_size: int = 1, fault: str | None = None, skip: bool = False) -> None:
        """Backward, the non-finite guard, clipping, the optimizer's update and the skip counters: all
        on the device (no host synchronisation), so the whole of it can be one CUDA graph. `skip`:
        an update that changes nothing (the graph's warm-up)."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        self.found.copy_(~torch.isfinite(loss.detach()))
        if world_size > 1:
            self._average(grads, world_size)
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        if fault == "GRADNAN" and grads:
            grads[0].fill_(float("nan"))
        self.loss_bad.copy_(self.found)
        if grads:  # any inf/nan in any gradient sets found to 1 (AMP's fused check; scale 1: no change)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found, self.one)
        if self.clip_val:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_val, foreach=True)
        if skip:
            self.found.fill_(1)
        self.opt.found_inf = self.found  # read by the fused kernel: no update, no state change, when 1
        self.opt.step()
        self.skipped.add_(self.found)
        self.run.add_(1).mul_(self.found)
        torch.maximum(self.longest, self.run, out=self.longest)

    # --- the whole step as one CUDA graph -----------------------------------------------------------

    def _graphed_step(self, x: torch.Tensor, step: int, beta: float) -> dict | None:
        """The step by replaying the captured graph (captured at the first call); None where the
        graph cannot serve (then the caller takes the ordinary path)."""
        eps = self.noise(x, step)
        if self.graph is None and not self._capture(x, eps, beta):
            return None
        if x.shape != self.static_x.shape:  # a batch of another size: this step eagerly
            return None
        self.static_x.copy_(x)
        self.static_eps.copy_(eps)
        self.beta_t.fill_(beta)
        self.graph.replay()
        if self.sched is not None:
            self.sched.step()  # fills the device tensor the graph's fused Adam reads as its lr
        return self.static_terms

    def _graph_body(self, skip: bool) -> dict:
        # A graph must not use autocast's cache of weight casts (the casts are replayed): the
        # surrounding autocast again, uncached for certain (Lightning 2.6 already disables it).
        with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
                            cache_enabled=False):
            terms = self.compiled(self.static_x, self.static_eps, self.beta_t)
        self._update(terms["loss"], skip=skip)
        return terms

    def _capture(self, x: torch.Tensor, eps: torch.Tensor, beta: float) -> bool:
        """Capture one optimizer step as a CUDA graph. The optimizer reads its learning rate from a
        device tensor (which the scheduler fills) and is marked capturable; warm-up steps (which
        compile the mathematics and create Adam's moments) are made with the update skipped, so
        they change neither weights, moments nor counters. On failure: one note, ordinary steps."""
        saved = [t.clone() for t in self.counters]
        groups = [(g["lr"], g.get("capturable", False)) for g in self.opt.param_groups]
        stream = torch.cuda.current_stream(x.device) if x.device.type == "cuda" else None
        try:
            for g in self.opt.param_groups:
                if not isinstance(g["lr"], torch.Tensor):
                    g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32, device=x.device)
                g["capturable"] = True
            self.static_x, self.static_eps = x.clone(), eps.clone()
            self.beta_t.fill_(beta)
            self.opt.zero_grad(set_to_none=True)
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(stream)
            try:
                with torch.cuda.stream(side):
                    for _ in range(3):
                        self._graph_body(skip=True)
                        self.opt.zero_grad(set_to_none=True)
            finally:
                stream.wait_stream(side)
            for t, v in zip(self.counters, saved):
                t.copy_(v)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a loader thread's CUDA calls (streaming path) do not abort the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                terms = self._graph_body(skip=False)
            self.graph, self.static_terms = graph, terms
            self.opt.zero_grad(set_to_none=True)  # the graph keeps its gradients in its own memory pool
            return True
        except Exception as err:
            # An invalidated capture raises at its end, before torch.cuda.graph restores the stream:
            # back to the run's stream, and the cause (the error inside the capture) in the note.
            if stream is not None:
                torch.cuda.set_stream(stream)
                torch.cuda.synchronize(x.device)
            cause = err.__context__ or err
            print(f"note: capturing the training step as one CUDA graph failed ({type(cause).__name__}: "
                  f"{str(cause).splitlines()[0][:200] if str(cause) else ''}); steps are launched one by one "
                  "(trainer.cuda_graph=false skips the attempt)", file=sys.stderr)
            self.cuda_graph, self.graph = False, None
            for g, (lr, capturable) in zip(self.opt.param_groups, groups):
                g["lr"] = float(lr) if isinstance(lr, torch.Tensor) else lr
                g["capturable"] = capturable
            for t, v in zip(self.counters, saved):
                t.copy_(v)
            self.opt.zero_grad(set_to_none=True)
            return False

    def _average(self, grads: list[torch.Tensor], world_size: int) -> None:
        """Mean of the gradients over ranks and whether any rank's loss was non-finite, in one
        all-reduce: every rank then takes (or skips) the same step."""
        flat = torch.cat([g.reshape(-1) for g in grads] + [self.found.reshape(1).to(grads[0].dtype)])
        dist.all_reduce(flat)
        flat[:-1].div_(world_size)
        self.found.copy_(flat[-1] > 0)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    # --- checkpoints --------------------------------------------------------------------------------

    @staticmethod
    def portable(checkpoint: dict) -> None:
        """The optimizer and scheduler states as an ordinary run writes them: the graph's device
        learning-rate tensor and `capturable` flag would tie a checkpoint to a GPU."""
        for state in checkpoint.get("optimizer_states", []):
            for g in state.get("param_groups", []):
                if isinstance(g.get("lr"), torch.Tensor):
                    g["lr"] = g["lr"].item()
                    g["capturable"] = False
        for state in checkpoint.get("lr_schedulers", []):
            if "_last_lr" in state:
                state["_last_lr"] = [v.item() if isinstance(v, torch.Tensor) else v for v in state["_last_lr"]]

    def state_dict(self) -> dict:
        # All four counters: a run of skipped steps that a checkpoint cuts in two still stops the
        # resumed run at the step the uninterrupted one stops (optim.max_nonfinite_steps).
        return {"skipped": self.skipped.cpu(), "run": self.run.cpu(), "longest": self.longest.cpu(),
                "loss_bad": self.loss_bad.cpu(), "scaler": self.scaler.state_dict() if self.scaler else {}}

    def load_state_dict(self, state: dict) -> None:
        for name in ("skipped", "run", "longest", "loss_bad"):
            if name in state:  # checkpoints from before the streak was saved hold "skipped" only
                getattr(self, name).copy_(state[name])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
