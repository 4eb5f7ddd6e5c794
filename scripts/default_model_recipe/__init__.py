"""The from-scratch recipe of the package's shipped default model (``hf_safe_exit/default_model``).

Not part of the library: ``scripts/train_default_model.py`` runs it. Its parts: :mod:`.recipe` (settings and
stages), :mod:`.objectives` (batch makers), :mod:`.loop` (the time-budgeted training loop), :mod:`.packaging`
(meta head, held-out evaluation, the package folder) and :mod:`.card` (the model card). What a user calls to
CALM-fine-tune a model of their own stays in :mod:`hf_safe_exit.training`.
"""
