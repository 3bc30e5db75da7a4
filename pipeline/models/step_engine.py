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
- optionally the step's mathematics compiled (`torch.compile`, CUDA graphs on GPU), its noise
  drawn outside and passed in, with an eager fallback that says so once.
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
                 precision: str = "32-true", compile_mode: str | None = None):
        self.module, self.opt, self.sched, self.clip_val = module, optimizer, scheduler, clip_val
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        device = self.params[0].device
        zero = torch.zeros((), device=device)
        self.found, self.one = zero.clone(), torch.ones((), device=device)
        # Device-side counters, read only when logged: skipped steps in all, the current run of
        # skipped steps, the longest run since the last check, whether the last skip was the loss.
        self.skipped, self.run, self.longest, self.loss_bad = zero.clone(), zero.clone(), zero.clone(), zero.clone()
        self.scaler = torch.amp.GradScaler(device.type) if str(precision).startswith("16") else None
        self.gen = torch.Generator(device=device)
        self.compiled = None
        self.beta_t = zero.clone()  # beta as a device tensor for the compiled step: a float input would
        # be recompiled for every value of a warm-up, or kept on the CPU, which CUDA graphs refuse
        if compile_mode is not None:
            self.compiled = torch.compile(self._terms_from_noise, mode=compile_mode, dynamic=False)

    # --- the objective ----------------------------------------------------------------------------

    def _terms_from_noise(self, x, eps, beta):
        return self.module.training_terms(x, beta, None, eps=eps)

    def terms(self, x: torch.Tensor, beta: float, step: int, rank: int, world_size: int = 1) -> dict:
        """The step's terms. Its noise is drawn for the whole global batch from (seed, step) and each
        rank takes its slice, so the run does not depend on how many ranks share the batch."""
        self.gen.manual_seed(derived_seed(self.module.cfg.run.seed, "train", step))
        eps = self.module.step_noise(x.shape[0], rank, world_size, self.gen)
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
        terms = self.terms(x, beta, step, rank, world_size)
        loss = terms["loss"]
        if fault == "NAN":
            loss = loss * float("nan")
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
        self.opt.found_inf = self.found  # read by the fused kernel: no update, no state change, when 1
        self.opt.step()
        if self.scaler is not None:
            self.scaler.update()
        if self.sched is not None:
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.skipped.add_(self.found)
        self.run.add_(1).mul_(self.found)
        torch.maximum(self.longest, self.run, out=self.longest)
        return terms

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

    def state_dict(self) -> dict:
        return {"skipped": self.skipped.cpu(), "scaler": self.scaler.state_dict() if self.scaler else {}}

    def load_state_dict(self, state: dict) -> None:
        if "skipped" in state:
            self.skipped.copy_(state["skipped"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
