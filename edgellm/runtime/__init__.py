"""Running a bundle: the decoder engine, the vision encoder, prompts and chat templates, sampling, streaming."""
