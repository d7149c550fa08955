"""pycoe.cotrain"""
