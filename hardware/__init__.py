"""What the machine is: chip tables, TPU slice topologies, and the CPU runtime set-up."""
