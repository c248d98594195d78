"""Half precision casts (float16, bfloat16), whole or layer by layer."""
