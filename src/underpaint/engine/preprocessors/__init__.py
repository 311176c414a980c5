"""ControlNet preprocessors ("annotators"): turn a unit's image into the control map its ControlNet expects.

The names, and the annotator files each needs, are ``underpaint.vocabulary``'s (``PREPROCESSOR_FILES``); the
API validates against them. Modules:

* ``registry``: name -> implementation (exactly the vocabulary's names), ``run_preprocessor``, ``check_files``;
* ``context``: ``Context`` (annotator folder, seed, device, network cache) and ``AnnotatorCache``, the LRU of
  loaded networks that the executor owns;
* ``aux``: importing controlnet_aux's submodules without its package ``__init__``;
* ``maps``: weight-free maps (canny, shuffle, lineart_standard, ...);
* ``networks``: the network annotators built from controlnet_aux's definitions and detectors;
* ``openpose``, ``dwpose``, ``mediapipe_face``: the pose and face annotators.

``none`` (or no preprocessor) uses the image as the control map.
"""

from underpaint.engine.preprocessors.context import A1111_RESOLUTION, AnnotatorCache, Context
from underpaint.engine.preprocessors.registry import PREPROCESSORS, check_files, run_preprocessor

__all__ = ["A1111_RESOLUTION", "PREPROCESSORS", "AnnotatorCache", "Context", "check_files", "run_preprocessor"]
