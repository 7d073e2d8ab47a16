"""Facts about the original example shared by the preset tests."""

TRUE_COEFFICIENTS = [1.5, -0.5, 0.0, -1.0, 2.0]  # c0 x1^2 + c1 x1 + c2 x2^2 + c3 x2 + c4
NOISE_FLOOR = 0.2**2  # the MSE of the noise itself
