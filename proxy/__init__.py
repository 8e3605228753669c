"""servegate: a reverse proxy in front of a model-inference server that turns ModelArts.4503
into no error at all, or a precise one."""
