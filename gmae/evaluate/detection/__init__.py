"""Detection and instance-segmentation transfer, ViTDet's way: a simple feature pyramid on a gmae encoder with
torchvision's Mask R-CNN heads (:mod:`.model`), box and mask data from the generators and COCO files
(:mod:`.data`), COCO's AP (:mod:`.metric`), the fine-tuning step and loop (:mod:`.train`), and pure-torch kernels for torchvision's ops where its compiled ones
cannot load (:mod:`.ops`)."""
