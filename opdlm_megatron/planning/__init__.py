"""opdlm-plan: layout checks and the memory per GPU, with the activation count held to a measurement."""
