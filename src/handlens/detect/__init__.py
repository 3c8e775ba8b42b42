"""Find, then classify: detectors trained on the catalog's boxes (torchvision heads on packaged backbones),
sliced inference over large images, and the detect -> crop -> classify -> explain pipeline."""
