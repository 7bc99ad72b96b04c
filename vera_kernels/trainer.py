"""transformers ``Trainer`` integration: the adapter files in every checkpoint.

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[vk.VeRATrainerCallback()])

Trainer checkpoints already hold the whole model (VeRA layers included: their
state is tensors only), so ``resume_from_checkpoint`` continues exactly; the
callback adds ``checkpoint-N/vera_adapter/``, the adapter being trained (the
active one) alone (:func:`vera_kernels.save_adapter`), loadable onto a fresh
base model.
"""

from __future__ import annotations

import os

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .adapter_files import save_adapter

__all__ = ["VeRATrainerCallback", "ADAPTER_SUBDIR"]

ADAPTER_SUBDIR = "vera_adapter"


class VeRATrainerCallback(TrainerCallback):
    """Writes the adapter files into each checkpoint the Trainer saves."""

    def on_save(self, args, state, control, model=None, **kwargs):
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        save_adapter(model, os.path.join(checkpoint, ADAPTER_SUBDIR))
        return control
