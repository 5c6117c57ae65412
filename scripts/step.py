"""One training step, the one definition the trainer, bench/speed.py and bench/profile_step.py
all time: forward and backward of each micro-batch (the loss on labelled tokens, plain or
fused), then clipping, AdamW and the learning-rate schedule. And evaluation on held-out data.
"""

import contextlib
import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from batches import collate, model_inputs, non_padding_tokens, shifted_targets, target_count
from chat_format import IGNORE_INDEX
from distributed import ONE_PROCESS
from errors import LoranotesError
from run_metrics import ratio_standard_error


class TrainingError(LoranotesError):
    """Training cannot start or go on: LoRA targets the model lacks, a loss that is not finite,
    a batch that does not fit in GPU memory."""


class LossNotFinite(Exception):
    """A step's loss is NaN or infinite; raised before its update, so the weights are sound."""

    def __init__(self, loss):
        super().__init__(f"loss is {loss}")
        self.loss = loss


class BatchOutOfMemory(Exception):
    """A micro-batch did not fit in GPU memory; `batch` is the one that failed."""

    def __init__(self, batch):
        super().__init__("out of GPU memory")
        self.batch = batch


@dataclass(frozen=True)
class StepOptions:
    """How a micro-batch's forward and backward run (speedups.Speedups says which are on)."""
    fused_loss: bool = False     # Liger's fused linear cross-entropy instead of logits
    target_logits: bool = False  # logits at the labelled positions only (target_token_losses)
    bf16_autocast: bool = False  # float32 LoRA weights, bf16 LoRA matmuls (CUDA)


class MicroBatch(NamedTuple):
    loss: float    # mean over the micro-batch's targets (of a window: over its normaliser)
    correct: int   # targets predicted right (argmax)
    targets: int
    tokens: int    # non-padding tokens


class StepResult(NamedTuple):
    loss: float
    token_accuracy: float
    lr: float
    grad_norm: float
    seconds: float
    tokens: int


def bf16_autocast(on):
    """float32 LoRA weights for the optimizer, bf16 LoRA matmuls: autocast on CUDA."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if on else contextlib.nullcontext()


# --- the loss ------------------------------------------------------------------------------------

def token_losses(logits, labels):
    """Next-token cross-entropy at every position (0 where there is no target), whether the
    argmax predicted the target, and which positions have one."""
    targets = shifted_targets(labels)
    logits = logits.float()
    losses = F.cross_entropy(
        logits.view(-1, logits.size(-1)), targets.view(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view_as(targets)
    mask = targets != IGNORE_INDEX
    return losses, (logits.argmax(-1) == targets) & mask, mask


def token_loss_sums(logits, labels):
    """Summed next-token cross-entropy, correct predictions and target count on labelled tokens."""
    losses, correct, mask = token_losses(logits, labels)
    return losses.sum(), correct.sum(), mask.sum()


def target_token_losses(model, batch):
    """token_losses at the labelled positions only: the decoder's last hidden states where a
    target follows go through the output layer (LoRA on it included), the others never do; the
    same losses and gradients. Returns each target's loss, whether the argmax hit it, and its
    row. Only for architectures whose logits are the output layer of the last hidden state, no
    scaling or softcapping (speedups.decide_speedups). Prompt and padding positions are 46% of
    a padded batch of the bundled sample, and the output layer is most of a tiny model's
    matmuls: the embedded default's steps on a CPU take 0.74-0.80x as long
    (bench/cpu_target_logits.py)."""
    causal_lm = model.get_base_model()  # the transformers model inside peft
    decoder = getattr(causal_lm, causal_lm.base_model_prefix)
    hidden = decoder(**model_inputs(batch)).last_hidden_state
    targets = shifted_targets(batch["labels"])
    mask = targets != IGNORE_INDEX
    logits = causal_lm.get_output_embeddings()(hidden[mask]).float()
    targets = targets[mask]
    losses = F.cross_entropy(logits, targets, reduction="none")
    return losses, logits.argmax(-1) == targets, mask.nonzero()[:, 0]


def can_fuse_loss(model):
    """Whether the output layer is a plain linear map the fused loss can read. With LoRA on
    lm_head (lora.target_modules) it is not: the fused loss would skip the adapter."""
    head = model.get_base_model().get_output_embeddings()
    return type(head) is torch.nn.Linear


def fused_token_loss_sums(model, inputs, labels):
    """token_loss_sums without logits: the decoder's last hidden states go through Liger's fused
    linear cross-entropy, chunk by chunk, with the gradient computed in the forward pass."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    causal_lm = model.get_base_model()  # the transformers model inside peft
    decoder = getattr(causal_lm, causal_lm.base_model_prefix)
    hidden = decoder(**inputs).last_hidden_state
    targets = shifted_targets(labels)
    loss_fn = LigerFusedLinearCrossEntropyLoss(
        ignore_index=IGNORE_INDEX, reduction="sum", return_predicted_tokens=True
    )
    head = causal_lm.get_output_embeddings().weight
    out = loss_fn(head, hidden.view(-1, hidden.size(-1)), targets.view(-1))
    mask = targets != IGNORE_INDEX
    correct = ((out.predicted_tokens.view_as(targets) == targets) & mask).sum()
    return out.loss, correct, mask.sum()


# --- one step ------------------------------------------------------------------------------------

def forward_backward(model, batch, options=StepOptions(), normaliser=None):
    """Forward and backward pass of one micro-batch: gradients of its summed token loss divided
    by `normaliser` (by default its own target count: its mean loss)."""
    with bf16_autocast(options.bf16_autocast):
        if options.fused_loss:
            loss_sum, correct, targets = fused_token_loss_sums(model, model_inputs(batch), batch["labels"])
        elif options.target_logits:
            losses, hits, _ = target_token_losses(model, batch)
            loss_sum, correct, targets = losses.sum(), hits.sum(), torch.tensor(losses.numel())
        else:
            logits = model(**model_inputs(batch)).logits
            loss_sum, correct, targets = token_loss_sums(logits, batch["labels"])
            # The autograd graph keeps what backward needs; holding the logits through backward
            # too would add their size to the peak (2.5 GB for Qwen3-4B at 4 x 1024, on an H100).
            del logits
    (loss_sum / (targets if normaliser is None else normaliser)).backward()
    return MicroBatch(loss_sum.item() / targets.item(), correct.item(), targets.item(),
                      non_padding_tokens(batch))


def accumulate(model, micro_batches, options=StepOptions(), *, normaliser=None,
               forward_backward=forward_backward, ranks=ONE_PROCESS):
    """Forward and backward of each micro-batch of an accumulation window: the gradients of the
    window's summed token loss over `normaliser` targets, by default all the window's (counted
    before the forward passes), so that 2 micro-batches of 4 conversations give the loss and
    gradients of one batch of 8. Data-parallel (`ranks`): the micro-batches are this rank's
    shares, the default normaliser counts every rank's, and the returned figures are summed
    over the ranks, so they are the global window's. Returns the window's MicroBatch: loss over
    `normaliser`, correct, targets, tokens.
    """
    if normaliser is None:
        [normaliser] = ranks.sum([sum(target_count(batch) for batch in micro_batches)])
    loss_sum = correct = targets = tokens = 0
    for batch in micro_batches:
        try:
            result = forward_backward(model, batch, options, normaliser)
        except torch.cuda.OutOfMemoryError as error:
            raise BatchOutOfMemory(batch) from error
        loss_sum += result.loss * result.targets
        correct += result.correct
        targets += result.targets
        tokens += result.tokens
    loss_sum, correct, targets, tokens = ranks.sum([loss_sum, correct, targets, tokens])
    return MicroBatch(loss_sum / normaliser, int(correct), int(targets), int(tokens))


class Update:
    """What a step applies after its backward passes: gradient clipping, AdamW over the LoRA
    parameters (collected once), the learning-rate schedule."""

    def __init__(self, model, training):
        from transformers import get_scheduler

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_grad_norm = training["max_grad_norm"]
        self.optimizer = torch.optim.AdamW(self.params, lr=training["lr"],
                                           weight_decay=training["weight_decay"])
        self.scheduler = get_scheduler(
            training["lr_scheduler"], self.optimizer,
            num_warmup_steps=training["warmup_steps"], num_training_steps=training["steps"],
        )

    def apply(self):
        """Clip, step, schedule, clear the gradients; returns (grad norm, lr of this step)."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm), lr

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def train_step(model, micro_batches, update, options=StepOptions(), *, normaliser=None,
               forward_backward=forward_backward, ranks=ONE_PROCESS):
    """One optimizer step over the micro-batches of its accumulation window (see accumulate),
    timed from the first forward to the finished update (on CUDA, synchronized at both ends).
    Data-parallel (`ranks`): `micro_batches` are this rank's shares (maybe none), the LoRA
    gradients are summed over the ranks before the update, and every rank takes the same step.

    `forward_backward`: the trainer's by default; bench/speed.py times its plain script's
    through the same step. Raises BatchOutOfMemory, and LossNotFinite before the update.
    """
    device = update.params[0].device
    synchronize(device)
    started = time.perf_counter()
    window = accumulate(model, micro_batches, options, normaliser=normaliser,
                        forward_backward=forward_backward, ranks=ranks)
    if not math.isfinite(window.loss):  # summed over the ranks: every rank stops here
        raise LossNotFinite(window.loss)
    ranks.reduce_gradients(update.params)
    grad_norm, lr = update.apply()
    synchronize(device)  # the step's kernels must finish before we time it
    return StepResult(window.loss, window.correct / window.targets, lr, grad_norm,
                      time.perf_counter() - started, window.tokens)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- evaluation ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Evaluation:
    loss: float  # mean over the split's target tokens
    accuracy: float  # share of target tokens predicted right (argmax)
    loss_se: float | None  # standard error of `loss` across conversations; None for fewer than 2
    target_tokens: int
    conversations: int  # those with a target token


@torch.no_grad()
def evaluate(model, examples, batch_size, pad_id, device, autocast=False, ranks=ONE_PROCESS,
             target_logits=False):
    """Token-weighted mean loss and accuracy over the assistant tokens of the eval split, with
    the standard error of the loss across its conversations (run_metrics.ratio_standard_error).
    Data-parallel (`ranks`): each rank evaluates its slice of the split and every rank gets the
    whole split's figures. `target_logits`: logits at the labelled positions only, as in
    training (StepOptions.target_logits)."""
    was_training = model.training
    model.eval()
    loss_sums, counts, correct = [], [], 0
    # In length order: a batch is padded to its longest conversation, and the figures do not
    # depend on the order (the embedded default's evaluation: 0.41 s in split order, 0.34-0.40 s sorted).
    share = sorted(ranks.eval_share(examples), key=lambda example: len(example[0]))
    for start in range(0, len(share), batch_size):
        batch = collate(share[start : start + batch_size], pad_id, device)
        # Compiled layers (training.compile) run eagerly here: a few eval batches of new shapes
        # without gradients are not worth another compilation.
        with bf16_autocast(autocast), torch.compiler.set_stance("force_eager"):
            if target_logits:
                losses, hits, rows = target_token_losses(model, batch)
                conversations = batch["labels"].size(0)
                loss_sums += torch.zeros(conversations, device=losses.device).index_add_(0, rows, losses).tolist()
                counts += torch.bincount(rows, minlength=conversations).tolist()
            else:
                logits = model(**model_inputs(batch)).logits
                losses, hits, mask = token_losses(logits, batch["labels"])  # a row per conversation
                loss_sums += losses.sum(1).tolist()
                counts += mask.sum(1).tolist()
        correct += int(hits.sum())
    model.train(was_training)
    shares = ranks.gather((loss_sums, counts, correct))  # in rank order: the split's order
    loss_sums = [s for share_sums, _, _ in shares for s in share_sums]
    counts = [c for _, share_counts, _ in shares for c in share_counts]
    correct = sum(share_correct for _, _, share_correct in shares)
    total = sum(counts)
    return Evaluation(loss=sum(loss_sums) / total, accuracy=correct / total,
                      loss_se=ratio_standard_error(loss_sums, counts), target_tokens=total,
                      conversations=sum(count > 0 for count in counts))
