"""Session set-up shared by every test module."""
from sims.lava_runner import import_lava

# Lava fixes the multiprocessing start method ('fork') when its runtime is imported and
# fails if anything (a tqdm lock, torch.export decompositions) fixed it first; importing it
# once up front makes the order of test modules irrelevant.
import_lava()
