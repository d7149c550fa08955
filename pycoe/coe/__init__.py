"""pycoe.coe"""
