"""The paper's figures: the Figure 4 neighbour grid and the conv1 kernels of Figure 3."""
