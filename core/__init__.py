"""core: the ground modules every package imports (the IR, the errors, the distributed helpers);
they import nothing first-party (docs/architecture.md, "Package layering")."""
