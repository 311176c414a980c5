"""ControlNet annotators implemented here (the registry, shared loading helpers and the others live in
``underpaint.engine.preprocessors``)."""
