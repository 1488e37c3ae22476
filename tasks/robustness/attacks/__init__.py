"""The attacks of the robustness check, one family per module (timm's habit).

Every model here is a ``torch.nn.Module`` taking ``(B, C, H, W)`` float images in pixel space
[0, 1] (models normalise internally) and returning logits ``(B, n_classes)``; the teacher's
feature extractor maps the same images to features ``(B, D)``. Budgets ``eps`` are L-inf radii
in the same pixel units (``1/255`` is one grey level of an 8-bit image).

- :mod:`._common`: the inputs, model state and projection every attack shares;
  :mod:`._base`: the :class:`~._base.Attack` protocol and what the sweep hands it.
- One public module per family, each ending with ``ATTACK = ...``, its registration:
  ``white_box`` (FGSM, PGD, APGD-CE on the student's gradients), ``teacher_transfer`` (crafted
  on the public teacher's features alone), ``universal`` (one perturbation from natural
  photographs), ``noise`` (the control), ``square`` (queries to the served student only).

:func:`tasks.robustness.suite.registered_attacks` loads every public module here, so a new
attack is one new file (plus its settings in ``tasks/config.py`` and ``params.yaml``).
"""
