"""`erase attack`: does an erased concept come back when someone tries to bring it back?

Two attacks, each run per prompt of a prompt set (the public attack suites' CSV layout):
  - UnlearnDiffAtk (erase.attack.unlearndiffatk): a few adversarial prefix tokens found by gradient descent so that
    the erased model denoises a target image (the base model's image for that prompt);
  - CCE (erase.attack.cce): one token learned by textual inversion on the erased model from images of the concept.
The runner (erase.attack.runner) generates, scores with `erase evaluate`'s detectors and reports attack success.
"""
