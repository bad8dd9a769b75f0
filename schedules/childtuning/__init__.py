"""ChildTuning (Xu et al., EMNLP 2021, "Raise a Child in Large Language Model"), one of the DPS
paper's baselines, as docs/algorithms.md §3 specifies: the baseline optimizer, but each step only a
"child network" of gradient entries reaches it. ``reserve_p`` (the config key ``schedule.keep_p``)
is the fraction of entries KEPT (unlike DPS's ``p``, ``schedule.drop_p``, the fraction dropped).

``schedule=childtuning_f`` (task-free), every optimizer step, for every parameter the optimizer
holds, with a fresh ``B ~ Bernoulli(reserve_p)`` per entry::

    g <- g * (B / reserve_p)

``schedule=childtuning_d`` (task-driven), once before training (``Schedule.before_training``): a
pass over one epoch of training batches, model in train mode (dropout on), for each of the ``N``
batches: backward, then for each selected tensor (names containing one of
``schedule.childtuning_patterns``, default ``["layer"]``, the reference's criterion): clip that
tensor's gradient to ``trainer.max_grad_norm`` on its own, ``F += g**2 / N``; zero the gradients.
Then one global threshold over all selected entries together::

    polar = numpy.percentile(F_all, (1 - reserve_p) * 100)     # linear interpolation
    M = F >= polar                                             # fixed for the whole run

and every optimizer step ``g <- g * M`` on the selected tensors; the others are not masked.

Both mask in ``on_gradients(step)``: after backward, unscaling and global clipping, before
``optimizer.step()`` -- where the reference's optimizer masks (inside ``step()``).

Decisions marked **(choice)**:

- **(choice) The base optimizer** is the baseline's (``schedule.optimizer``, default torch
  ``AdamW``, built with ``schedule.impl``: fused / foreach / loop), with the schedule's lr, betas,
  eps, weight decay and LR schedule. The reference's ``ChildTuningAdamW`` is Hugging Face's
  AdamW maths (bias correction on) but applies the decoupled decay *after* the Adam update
  (``θ <- (θ - s·m̂/(√v̂+ε)) - lr·λ·(θ - s·m̂/(√v̂+ε))``); torch's AdamW decays *before* it
  (``θ <- θ(1 - lr·λ) - s·m̂/(√v̂+ε)``); docs/algorithms.md §3 says "decay before the update", but
  the reference code (like ``transformers.AdamW``, "fixed version") decays after. The two differ
  by ``lr·λ·s·m̂/(√v̂+ε)`` per step, the step times ``lr·λ`` (2e-7 of it at lr 2e-5, λ 0.01); we
  keep torch's order so that the fast fused/foreach paths apply and ChildTuning differs from the
  baseline schedule only by its mask.
- **(choice) Randomness (F).** ``B`` is drawn from a ``torch.Generator`` owned by the schedule on
  the parameters' device (a full-size draw per step; drawing on the CPU and copying would cost a
  transfer of every gradient's size each step), one draw per tensor in the optimizer's parameter
  order, as ``torch.rand(shape) < reserve_p``. Its seed follows the run seed without drawing from
  the global generator (``adaptune.schedules.sync.shared_seed``, rank 0's under DDP, so every rank draws
  the same ``B``); its state is in ``state_dict()``, so a resumed run continues the same stream.
  The same seed gives different ``B`` on CPU and CUDA (different generators). Tensors without a
  gradient draw nothing; ``reserve_p = 1`` draws nothing (the mask would be all ones).
- **(choice) The Fisher pass (D) leaves the run's random state untouched**: it runs under
  ``torch.random.fork_rng``, so the dropout masks of training are those of a baseline run with
  the same seed (the reference's pass draws from the global generator). Its batches are the
  task's epoch-0 batch plans (shuffled, training batch size; the loop's ``_batch_loss``), the
  forward under the run's autocast, the loss the batch's mean; gradients are cleared before and
  after. The reference's pass ran in fp32; under ``trainer.precision=fp16`` (no loss scaling in
  the pass) activation gradients below fp16's range flush to zero, which can only lower scores
  that are tiny already. Under DDP the callables run through the DDP model (all-reduced gradients) and the masks
  are broadcast from rank 0. A tensor that gets no gradient in a batch adds nothing.
- **(choice) The threshold** is computed with ``numpy.percentile`` on one fp32 CPU copy of all
  selected scores (transient; 4 bytes per selected entry), exactly the reference's arithmetic;
  masks are ``bool`` (1 byte per selected entry), kept for the run and saved in
  ``state_dict()`` with the threshold: a resumed run skips the pass and restores them.
- **(choice) Selection by name substring** (``schedule.childtuning_patterns``, default
  ``["layer"]``): for Hugging Face BERT-style encoders that is every tensor of
  ``encoder.layer.N`` (attention, feed-forward, their LayerNorms and biases) and not the
  embeddings, pooler or head; fairseq's ``layers.N`` match too; timm ViT needs ``[blocks]``. A
  list that matches no trainable parameter is a ``ConfigError`` naming the key.
- Dropout stays as the model has it (the reference does not change it), and, as for DPS, the
  mask only touches the gradient: momentum and weight decay still move masked entries.
"""

from .algorithm import STATE_VERSION, ChildTuningD, ChildTuningF, fisher_information, percentile_threshold
from .schedule import ChildTuningDSchedule, ChildTuningFSchedule

__all__ = [
    "STATE_VERSION",
    "ChildTuningD",
    "ChildTuningDSchedule",
    "ChildTuningF",
    "ChildTuningFSchedule",
    "fisher_information",
    "percentile_threshold",
]
