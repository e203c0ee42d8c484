"""One module per section of the suite; each section function takes a harness.Ctx and returns
its table(s)."""
